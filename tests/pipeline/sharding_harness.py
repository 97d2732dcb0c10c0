"""tests/harness.py, recording each rank's data-parallel memory too (``<job>/memory<rank>.json``).

Usage as tests/harness.py: ``python tests/pipeline/sharding_harness.py JOBS.json OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tests.harness as harness

_parameters = harness._parameters
_run_job = harness.run_job
_current: dict[str, Any] = {}


def _recording_parameters(trainer: Any, model: Any) -> Any:
    memory = getattr(trainer.strategy, "data_parallel_memory", lambda: None)()
    target = _current["out"] / _current["job"]
    target.mkdir(parents=True, exist_ok=True)
    (target / f"memory{trainer.global_rank}.json").write_text(json.dumps(memory))
    return _parameters(trainer, model)


def _recording_run_job(job: dict[str, Any], out_dir: Path) -> None:
    _current.update(job=job["name"], out=out_dir)
    _run_job(job, out_dir)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    harness._parameters = _recording_parameters
    harness.run_job = _recording_run_job
    harness.main()

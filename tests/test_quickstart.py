"""The README's main job and the dry run, from their Hydra entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_script


def test_dry_run_writes_the_plan_without_training(tmp_path: Path) -> None:
    proc = run_script(
        [
            str(ROOT / "examples" / "quickstart.py"),
            "dry_run=true",
            "strategy.balance=memory",
            "trainer.devices=4",
            "strategy.data_parallel_size=2",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted:" in proc.stdout
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["layout"] == {"dp": 2, "pp": 2, "tp": 1}
    assert [s["ranks"] for s in report["stages"]] == [[0, 2], [1, 3]]
    assert sum(s["num_layers"] for s in report["stages"]) == report["num_layers"]
    assert all(s["predicted_memory_bytes"] > 0 for s in report["stages"])


@pytest.mark.distributed
def test_quickstart_trains_and_prints_its_summary(tmp_path: Path) -> None:
    proc = run_script(
        [
            str(ROOT / "examples" / "quickstart.py"),
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "strategy.balance=uniform",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "lightning-mp summary: 6 steps" in output
    assert "busy s/step" in output and "stage 1: blocks.2..blocks.3" in output

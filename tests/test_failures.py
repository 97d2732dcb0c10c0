"""Bad input and dead ranks: every rank exits non-zero, quickly, with a message that names the problem and fix."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_harness

pytestmark = pytest.mark.distributed


def _job(model: str, strategy: dict[str, Any] | None = None, **model_kwargs: Any) -> dict[str, Any]:
    return {
        "name": model,
        "model": model,
        "devices": 2,
        "model_kwargs": model_kwargs,
        "strategy": strategy or {"pipeline_parallel_size": 2},
    }


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (_job("unsplittable"), "found no repeated blocks to split"),
        (_job("twice"), r"layer net\.0 was called 2 times in one forward"),
        (_job("sequential", {"pipeline_parallel_size": 2, "balance": [4, 2]}), "sums to 6 but the model has 5 layers"),
        (_job("reentrant"), r"returned no tensor that carries a gradient.*use_reentrant=False"),
        (_job("bypass"), r"output of 'wpe', a module of the first stage, reaches the loss without passing"),
        (_job("sequential", {"pipeline_parallel_size": 2, "layers": "loss_fn"}), "layers='loss_fn' is a"),
        (
            _job("sequential", {"pipeline_parallel_size": 3}),
            r"world size 2 \(devices × nodes\) is not divisible by pipeline_parallel_size\(3\)",
        ),
        ({**_job("sequential"), "meta": True}, r"parameters of SequentialNet are on the meta device"),
    ],
    ids=[
        "no-blocks",
        "block-called-twice",
        "bad-balance",
        "reentrant-checkpoint",
        "connection-around-layers",
        "bad-layers",
        "bad-layout",
        "weights-on-meta",
    ],
)
def test_bad_input_fails_fast_with_the_fix(tmp_path: Path, job: dict[str, Any], message: str) -> None:
    start = time.monotonic()
    proc = run_harness([job], tmp_path, timeout=180)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    assert re.search(message, proc.stderr), proc.stderr[-3000:]


@pytest.mark.parametrize(("rank", "mode"), [(1, "exit"), (0, "raise"), (1, "raise")])
def test_a_failing_rank_ends_every_rank(tmp_path: Path, rank: int, mode: str) -> None:
    start = time.monotonic()
    proc = run_harness([_job("fails", rank=rank, step=2, mode=mode)], tmp_path, timeout=180)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90, "ranks outlived the failure"

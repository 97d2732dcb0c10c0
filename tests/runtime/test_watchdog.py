"""Bad input and dead ranks: every rank exits non-zero, quickly, with a message that names the problem and fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.timing import run_harness_timed

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
        ({**_job("gpt"), "meta": True}, r"MultiheadAttention.reset_parameters.*give that module a reset_parameters"),
        (
            _job("sequential", {"pipeline_parallel_size": 2, "microbatches": 16}),
            r"microbatches=16 is larger than the batch of 8 samples.*Use microbatches<=8",
        ),
    ],
    ids=[
        "no-blocks",
        "block-called-twice",
        "bad-balance",
        "reentrant-checkpoint",
        "connection-around-layers",
        "bad-layers",
        "bad-layout",
        "meta-module-without-reset_parameters",
        "more-microbatches-than-samples",
    ],
)
def test_bad_input_fails_fast_with_the_fix(tmp_path: Path, job: dict[str, Any], message: str) -> None:
    proc = run_harness_timed([job], tmp_path, timeout=300)
    assert proc.returncode != 0
    assert not proc.leftover and (not proc.started or proc.after_start_s < 60), "the ranks outlived the error"
    assert re.search(message, proc.stderr), proc.stderr[-3000:]


@pytest.mark.parametrize(("rank", "mode"), [(1, "exit"), (1, "kill"), (0, "raise"), (1, "raise")])
def test_a_failing_rank_ends_every_rank(tmp_path: Path, rank: int, mode: str) -> None:
    proc = run_harness_timed([_job("fails", rank=rank, step=2, mode=mode)], tmp_path, timeout=300)
    assert proc.returncode != 0
    assert proc.started and not proc.leftover and proc.after_start_s < 60, "ranks outlived the failure"
    if mode == "raise":  # the original error, with the rank and stage it came from
        assert "RuntimeError: injected failure" in proc.stderr
        assert f"lightning-mp: raised on rank {rank} (stage {rank})" in proc.stderr
    if mode == "raise" and rank == 1:  # rank 0 says which rank failed first, and with what (when rank 0 fails, it
        # ends the processes it launched itself)
        pattern = r"\[rank0\].*rank 1 \(stage 1\) failed: RuntimeError: injected failure"
        assert re.search(pattern, proc.stderr, re.IGNORECASE), proc.stderr[-3000:]
    if mode != "raise":  # killed: the surviving rank names the message it was waiting for and the peer
        pattern = r"rank 0 \(stage 0\).* (receive|send) the (gradient|activation) of micro-batch \d+ (from|to) rank 1"
        assert re.search(pattern, proc.stderr), proc.stderr[-3000:]


def test_a_hung_rank_is_named_after_the_timeout(tmp_path: Path) -> None:
    # timeout=5 bounds the messages only: the ranks' start-up (however slow) is not part of it, nor of the bound here
    job = _job("fails", {"pipeline_parallel_size": 2, "balance": "uniform", "timeout": 5}, rank=1, step=2, mode="hang")
    proc = run_harness_timed([job], tmp_path, timeout=300)
    assert proc.returncode != 0
    assert proc.started and not proc.leftover and proc.after_start_s < 60, "ranks outlived the timeout"
    assert re.search(r"rank 0 \(stage 0\).*the gradient of micro-batch \d+ from rank 1 \(stage 1\)", proc.stderr), (
        proc.stderr[-3000:]
    )

"""Long runs stay flat and runs repeat: resident memory does not grow with the step count, and a fixed seed gives
the same losses and weights run after run (bit for bit)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_result, run_harness

pytestmark = pytest.mark.distributed

KW = {"layers": 4, "batch_size": 4, "n": 32, "lengths": [8, 12]}
PIPELINE = {"pipeline_parallel_size": 2, "microbatches": 2, "balance": "uniform"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_resident_memory_is_flat_over_200_steps(tmp_path: Path) -> None:
    job = {"name": "long", "model": "gpt", "model_kwargs": KW, "devices": 2, "max_steps": 200, "strategy": PIPELINE}
    proc = run_harness([job], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in range(2):
        rss = load_result(tmp_path, "long", rank)["rss"]
        assert len(rss) == 200
        growth = rss[199] / rss[19] - 1
        assert growth < 0.05, f"rank {rank}: resident memory grew {growth:.1%} from step 20 to step 200"


def test_a_fixed_seed_repeats_bit_for_bit(tmp_path: Path) -> None:
    jobs = [
        {"name": name, "model": "gpt", "model_kwargs": KW, "devices": 2, "max_steps": 6, "strategy": PIPELINE}
        for name in ("first", "second")
    ]
    proc = run_harness(jobs, tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in range(2):
        first, second = (load_result(tmp_path, name, rank) for name in ("first", "second"))
        assert first["losses"] == second["losses"]
        assert all(torch.equal(first["params"][n], second["params"][n]) for n in first["params"])


@pytest.mark.parametrize(
    "schedule", ["1f1b", "zero_bubble", "interleaved_1f1b", "zero_bubble_v"], ids=lambda s: s.replace("_", "-")
)
def test_steady_state_steps_send_no_headers(tmp_path: Path, schedule: str) -> None:
    """Batches of two lengths: each stage message's structure goes once per shape (the first two steps), then the
    steps send tensors only, the same operations every step (no header read on the host)."""
    strategy = {"pipeline_parallel_size": 2, "microbatches": 4, "schedule": schedule, "balance": "uniform"}
    kw = {"layers": 4, "batch_size": 4, "n": 32, "lengths": [8, 12]}
    job = {"name": "steady", "model": "gpt", "model_kwargs": kw, "devices": 2, "max_steps": 6, "strategy": strategy}
    proc = run_harness([job], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in range(2):
        counts = load_result(tmp_path, "steady", rank)["messages"]
        assert counts[0]["headers"] > 0 or rank == 1
        assert counts[1]["headers"] == counts[-1]["headers"], f"rank {rank} sent headers in steady steps: {counts}"
        per_step = {counts[i]["messages"] - counts[i - 1]["messages"] for i in range(2, len(counts))}
        assert len(per_step) == 1, f"rank {rank}: steady steps post different numbers of messages: {counts}"

"""On GPUs (marker ``cuda``; skipped without them): pp = 2 over NCCL on two GPUs against one GPU, with 16 MiB messages,
and the NVML utilization that the strategy logs per stage. The cases are those of ``benchmarks/gpu_check.py``, run
through the tests' harness (``"accelerator": "gpu"``).

Run on a machine with at least 2 GPUs: ``pytest -m cuda``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from lightning_mp.runtime.clock import EventClock, device_utilization
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail

GPUS = torch.cuda.device_count()
pytestmark = pytest.mark.cuda
one_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA devices, found {GPUS}")


def test_the_cases_send_at_least_16_mib_per_message() -> None:
    assert gpu_check.MESSAGE_BYTES >= 16 * 2**20
    job = gpu_check.case_job("1f1b", "32-true")
    assert job["model_kwargs"]["batch_size"] == gpu_check.MICROBATCH * job["strategy"]["microbatches"]
    assert job["model_kwargs"]["width"] * gpu_check.MICROBATCH * 4 == gpu_check.MESSAGE_BYTES


@one_gpu
def test_nvml_reports_the_gpu_utilization() -> None:
    value = device_utilization(torch.device("cuda", 0))
    if value is None:
        pytest.skip("NVML cannot be read here (pip install nvidia-ml-py)")
    assert 0.0 <= value <= 100.0


@one_gpu
def test_the_event_clock_measures_device_time() -> None:
    device = torch.device("cuda", 0)
    clock = EventClock(device)
    a = torch.randn(2048, 2048, device=device)
    clock.start_step()
    start = clock.mark()
    for _ in range(20):
        a = a @ a / 2048
    t0, t1 = clock.seconds([start, clock.mark()])
    assert t1 > t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "cuda", gpu_check.jobs())


@pytest.mark.distributed
@two_gpus
@pytest.mark.parametrize("schedule", gpu_check.FP32_SCHEDULES)
def test_fp32_over_nccl_matches_one_gpu(runs: Path, schedule: str) -> None:
    ref = load_result(runs, gpu_check.reference_name("32-true"), 0)
    for rank in range(2):
        got = load_result(runs, gpu_check.case_name(schedule, "32-true"), rank)
        assert_matches_reference(ref, got, atol=gpu_check.EXACT_ATOL)


@pytest.mark.distributed
@two_gpus
@pytest.mark.parametrize("precision", gpu_check.MIXED_PRECISIONS)
def test_mixed_precision_over_nccl_trains_without_nan(runs: Path, precision: str) -> None:
    ref = load_result(runs, gpu_check.reference_name(precision), 0)
    ranks = [load_result(runs, gpu_check.case_name("1f1b", precision), r) for r in range(2)]
    for got in ranks:
        assert len(got["losses"]) == gpu_check.STEPS
        assert gpu_check.finite(got), got["losses"]
    for a, b in zip(ref["losses"], ranks[0]["losses"]):
        assert abs(a - b) <= gpu_check.MIXED_LOSS_RTOL * abs(a), (ref["losses"], ranks[0]["losses"])


@pytest.mark.distributed
@two_gpus
def test_each_stage_logs_its_gpu_utilization(runs: Path) -> None:
    if device_utilization(torch.device("cuda", 0)) is None:
        pytest.skip("NVML cannot be read here (pip install nvidia-ml-py): nothing is logged")
    for rank in range(2):
        got = load_result(runs, gpu_check.case_name("1f1b", "32-true"), rank)
        for step in got["metrics"]:
            for stage in range(2):
                value = step[f"pipeline/stage{stage}_gpu_util"]
                assert 0.0 <= value <= 100.0 and not math.isnan(value)
        rows = got["summary"]["ranks"]
        assert sorted(r["stage"] for r in rows) == [0, 1]
        assert all(r["gpu_util"] is not None and 0.0 <= r["gpu_util"] <= 100.0 for r in rows)

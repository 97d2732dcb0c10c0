"""Per-stage utilization metrics and balance advice while training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mp.observe import monitor
from lightning_mp.observe.monitor import StageMonitor, stage_utilization
from lightning_mp.observe.stats import StepStats
from lightning_mp.runtime import clock
from tests.conftest import assert_matches_reference, load_result, run_harness, run_jobs_or_fail


def test_metrics_per_stage_and_bubble() -> None:
    monitor = StageMonitor([2, 2], warmup=0)
    metrics = monitor.update([StepStats(busy=1.0, wait=0.5, wall=2.0), StepStats(busy=2.0, wait=0.0, wall=2.0)])
    assert metrics["pipeline/stage0_utilization"] == pytest.approx(0.5)
    assert metrics["pipeline/stage1_busy_s"] == pytest.approx(2.0)
    assert metrics["pipeline/bubble"] == pytest.approx(0.25)
    assert monitor.imbalance == pytest.approx(2.0 / 1.5)


def test_advice_uses_layer_timings_and_keeps_the_head_on_the_last_stage() -> None:
    monitor = StageMonitor([2, 4], warmup=0)
    # every layer: 0.1 s forward (0.3 s with backward); the last stage also runs a 0.6 s head
    for _ in range(3):
        monitor.update(
            [
                StepStats(busy=0.6, wall=2.0, layer_forward=[0.1] * 2),
                StepStats(busy=1.8, wall=2.0, layer_forward=[0.1] * 4),
            ]
        )
    assert monitor.suggestion() == [4, 2]


def test_no_advice_when_balanced() -> None:
    monitor = StageMonitor([3, 3], warmup=0)
    monitor.update([StepStats(busy=1.0, wall=1.1), StepStats(busy=1.05, wall=1.1)])
    assert monitor.suggestion() is None


def test_no_gpu_utilization_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert clock.device_utilization(cpu) is None
    monkeypatch.setattr(clock, "device_utilization", lambda device: pytest.fail("NVML read on a CPU"))
    assert stage_utilization(cpu) is None


def test_a_gpu_reads_its_utilization_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor, "reads_utilization", lambda device: True)  # as on a GPU
    monkeypatch.setattr(clock, "device_utilization", lambda device: 73.0)
    assert stage_utilization(torch.device("cpu")) == 73.0
    monkeypatch.setattr(clock, "device_utilization", lambda device: None)  # a GPU without NVML
    assert stage_utilization(torch.device("cpu")) is None


@pytest.fixture(scope="module")
def utilization_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 2-stage run twice: as on a CPU, and with NVML faked as reading 40% on rank 0 and 41% on rank 1
    (tests/harness.py ``fake_gpu_util``; the readings travel between the ranks by a real collective)."""
    job = {
        "name": "cpu",
        "model": "gpt",
        "model_kwargs": {"batch_size": 6, "n": 18},
        "devices": 2,
        "strategy": {"microbatches": 2},
        "max_steps": 3,
        "summary": True,
    }
    faked = {**job, "name": "faked", "fake_gpu_util": [40.0, 41.0]}
    return run_jobs_or_fail(tmp_path_factory, "utilization", [job, faked])


@pytest.mark.distributed
def test_each_stage_logs_its_gpu_utilization_beside_busy_and_wait(utilization_runs: Path) -> None:
    for rank in range(2):
        got = load_result(utilization_runs, "faked", rank)
        assert len(got["metrics"]) == 3
        for step in got["metrics"]:
            assert step["pipeline/stage0_gpu_util"] == 40.0 and step["pipeline/stage1_gpu_util"] == 41.0
            assert "pipeline/stage1_busy_s" in step
        rows = {r["stage"]: r for r in got["summary"]["ranks"]}
        assert (rows[0]["gpu_util"], rows[1]["gpu_util"]) == (40.0, 41.0)
        assert got["losses"] == load_result(utilization_runs, "cpu", rank)["losses"]


@pytest.mark.distributed
def test_nothing_about_gpu_utilization_on_a_cpu(utilization_runs: Path) -> None:
    for rank in range(2):
        got = load_result(utilization_runs, "cpu", rank)
        assert "pipeline/stage1_busy_s" in got["final_metrics"]
        assert not [key for step in got["metrics"] for key in step if "gpu_util" in key]
        assert all("gpu_util" not in row for row in got["summary"]["ranks"])


@pytest.mark.distributed
def test_imbalanced_split_is_reported_with_a_ready_override(tmp_path: Path) -> None:
    job = {
        "name": "skewed",
        "model": "gpt",
        "model_kwargs": {"layers": 6, "batch_size": 6, "n": 120, "d": 128},
        "devices": 2,
        "strategy": {"balance": [1, 5], "microbatches": 2},
        "max_steps": 16,
    }
    proc = run_harness([job], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "the pipeline stages are imbalanced" in proc.stderr
    assert "strategy.balance=[" in proc.stderr
    for rank in range(2):
        metrics = load_result(tmp_path, "skewed", rank)["final_metrics"]
        assert {"pipeline/bubble", "pipeline/stage0_utilization", "pipeline/stage1_busy_s"} <= set(metrics)


@pytest.mark.distributed
@pytest.mark.parametrize("every", [3, "epoch"])
def test_rebalancing_moves_layers_and_keeps_the_numbers(tmp_path: Path, every: int | str) -> None:
    # SGD with momentum: the momentum buffers must move with the layers. (Adam would turn the noise-level
    # gradients of MultiheadAttention's key bias into lr-sized updates, in one process and pipelined alike.)
    # "epoch": 6 steps per epoch, so the move happens before step 7.
    kw = {"layers": 6, "batch_size": 6, "n": 120 if every == 3 else 36, "d": 128, "lr": 0.05}
    jobs = [
        {"name": "ref", "model": "gpt", "model_kwargs": kw, "max_steps": 12},
        {
            "name": "moving",
            "model": "gpt",
            "model_kwargs": kw,
            "devices": 2,
            "max_steps": 12,
            "strategy": {"balance": [1, 5], "microbatches": 2, "rebalance": True, "rebalance_every": every},
        },
    ]
    proc = run_harness(jobs, tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rebalanced the pipeline from balance=[1, 5] to balance=" in proc.stdout + proc.stderr
    ref = load_result(tmp_path, "ref", 0)
    stages = [load_result(tmp_path, "moving", r) for r in range(2)]
    for got in stages:
        assert_matches_reference(ref, got)
    assert set(stages[0]["params"]) | set(stages[1]["params"]) == set(ref["params"])
    assert len(stages[0]["params"]) > 2 * 12  # stage 0 now holds more than one block (12 tensors each)


@pytest.mark.distributed
def test_pipeline_metrics_reach_the_loggers_at_the_steps_of_the_models_own_values(tmp_path: Path) -> None:
    """pipeline/... values are written without self.log's per-key cost, yet where self.log would put them: in
    the logger's rows of the steps Lightning logs (log_every_n_steps, with gradient accumulation) beside the model's
    own train_loss."""
    job = {
        "name": "logged",
        "model": "gpt",
        "model_kwargs": {"batch_size": 4, "n": 48},
        "devices": 2,
        "strategy": {"microbatches": 2},
        "max_steps": 3,
        "csv_logger": True,
        "trainer": {"log_every_n_steps": 2, "accumulate_grad_batches": 2},
    }
    proc = run_harness([job], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    import csv

    rows = list(csv.DictReader((tmp_path / "logged" / "csv" / "metrics.csv").open()))
    pipeline = {int(r["step"]) for r in rows if r.get("pipeline/bubble")}
    own = {int(r["step"]) for r in rows if r.get("train_loss")}
    assert own and pipeline == own, rows

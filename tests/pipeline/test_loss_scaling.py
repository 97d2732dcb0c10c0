"""fp16 with a loss scaler (issue 15): every micro-batch's backward loss scaled, gradients unscaled once by Lightning,
and an inf/NaN on any stage skips the step on every rank and lowers the scale alike, as in one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mp.pipeline.loss_scaling import agree_on_overflow, local_overflow, loss_scaler_of
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail

KW = {"batch_size": 6, "n": 20}
OVERFLOWING = {"init_scale": 2.0**20}  # the first steps overflow in fp16 and are skipped, then the scale settles
NOT_OVERFLOWING = {"init_scale": 2.0**8, "growth_interval": 1000}  # no step skipped: the numbers can be compared


def test_local_overflow_sees_inf_and_nan_without_host_reads() -> None:
    assert local_overflow([]) is False
    assert not bool(local_overflow([torch.ones(3), torch.full((2,), 1e38)]))  # large but finite: no false alarm
    assert bool(local_overflow([torch.ones(3), torch.tensor([1.0, float("inf")])]))
    assert bool(local_overflow([torch.tensor([float("nan")], dtype=torch.float16)]))


def test_the_scaler_is_found_on_fp16_plugins_only() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    assert loss_scaler_of(MixedPrecision("bf16-mixed", "cpu")) is None
    scaler = torch.amp.GradScaler("cpu")
    assert loss_scaler_of(MixedPrecision("16-mixed", "cpu", scaler=scaler)) is scaler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_overflows(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(param.sum()).backward()
    if rank == 1:  # only the second stage's gradients overflowed
        param.grad[2] = float("inf")
    overflow = agree_on_overflow([param], torch.device("cpu"))
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    torch.save({"overflow": overflow, "scale": scaler.get_scale(), "param": param.detach().clone()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_an_inf_on_one_rank_skips_the_step_and_lowers_the_scale_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_one_rank_overflows, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["overflow"] is True
        assert got["scale"] == 512.0  # backed off once, alike
        assert torch.equal(got["param"], torch.ones(4))  # the step was skipped


def _job(name: str, scaler: dict[str, float], strategy: dict[str, Any] | None = None) -> dict[str, Any]:
    job: dict[str, Any] = {"name": name, "model": "gpt", "model_kwargs": KW, "max_steps": 8, "fp16_scaler": scaler}
    if strategy is not None:
        job.update(devices=2, strategy={"pipeline_parallel_size": 2, **strategy})
    return job


@pytest.fixture(scope="module")
def fp16_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    jobs = [
        _job("ref-overflowing", OVERFLOWING),
        _job("pp2-m1-overflowing", OVERFLOWING, {"schedule": "1f1b", "microbatches": 1}),
        _job("pp2-zero_bubble-overflowing", OVERFLOWING, {"schedule": "zero_bubble", "microbatches": 4}),
        _job("ref", NOT_OVERFLOWING),
        _job("pp2-1f1b", NOT_OVERFLOWING, {"schedule": "1f1b", "microbatches": 4}),
        _job("pp2-zero_bubble", NOT_OVERFLOWING, {"schedule": "zero_bubble", "microbatches": 4}),
    ]
    return run_jobs_or_fail(tmp_path_factory, "fp16", jobs)


@pytest.mark.distributed
def test_one_microbatch_matches_one_process_bit_for_bit_with_the_same_skipped_steps(fp16_runs: Path) -> None:
    """One micro-batch: the same kernels on the same values, so fp16 gives the same bits, overflows included."""
    ref = load_result(fp16_runs, "ref-overflowing", 0)
    assert ref["scales"][0] < OVERFLOWING["init_scale"]  # the first step overflowed and was skipped
    for rank in range(2):
        got = load_result(fp16_runs, "pp2-m1-overflowing", rank)
        assert got["scales"] == ref["scales"]
        assert_matches_reference(ref, got, atol=0.0)


@pytest.mark.distributed
def test_skipped_steps_agree_across_stages(fp16_runs: Path) -> None:
    """Micro-batches back-propagate 1/m of the loss each, so they overflow at other scales than one whole batch:
    the skipped steps may differ from one process, never between the stages."""
    scales = [load_result(fp16_runs, "pp2-zero_bubble-overflowing", r)["scales"] for r in range(2)]
    assert scales[0] == scales[1]
    assert scales[0][-1] < OVERFLOWING["init_scale"]


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_several_microbatches_train_within_fp16_tolerance(fp16_runs: Path, schedule: str) -> None:
    """Several micro-batches: each fp16 product sums over fewer samples and the fp32 gradients add up the parts in
    another order, so the numbers agree to fp16's rounding (measured: 1.7e-4 after 8 steps), not bit for bit; no
    step is skipped."""
    ref = load_result(fp16_runs, "ref", 0)
    for rank in range(2):
        got = load_result(fp16_runs, f"pp2-{schedule}", rank)
        assert got["scales"] == ref["scales"] == [NOT_OVERFLOWING["init_scale"]] * 8
        assert_matches_reference(ref, got, atol=1e-3)

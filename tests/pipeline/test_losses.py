"""Token-mean losses over padded batches train to the numbers of one process, under every schedule, accumulation,
tensor and data parallelism: micro-batches weigh in by the tokens their mean averages (pipeline/losses.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from lightning_mp.pipeline.losses import MeanLossRecorder, RecorderPlacement, StepLosses
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail

KW = {"batch_size": 6, "n": 20}  # padded rows of 2..12 real tokens: 3 micro-batches hold very different counts
SCHEDULES = ["gpipe", "1f1b", "zero_bubble", "interleaved_1f1b", "zero_bubble_v"]
MODELS = ["padded_gpt", "padded_hf_llama"]
EXTRAS = {"trainer": {"accumulate_grad_batches": 2}, "limit_val_batches": 2, "val_check_interval": 2}


# ---- recognising means (one process) ------------------------------------------------------------------------------


def test_recorder_counts_what_each_mean_divides_by() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([1, -100, 2, 3])
    weight = torch.rand(5)
    with MeanLossRecorder() as recorder:
        ce = F.cross_entropy(x, target)
        weighted = torch.nn.CrossEntropyLoss(weight=weight)(x, target)
        mse = F.mse_loss(x, torch.zeros(4, 5))
        summed = F.cross_entropy(x, target, reduction="sum")
        mean = x.mean()
    counts = [float(c.count) for c in recorder.calls]
    assert counts == pytest.approx([3, float(weight[[1, 2, 3]].sum()), 20, 20])  # the summed CE is no mean
    assert torch.allclose(ce, F.cross_entropy(x, target)) and torch.allclose(
        weighted, F.cross_entropy(x, target, weight=weight)
    )
    assert recorder.find(ce) is recorder.calls[0] and recorder.find(mean) is recorder.calls[-1]
    assert recorder.find(summed) is None and recorder.find(mse * 1.0) is None


def test_a_micro_batch_of_padding_only_back_propagates_zeros() -> None:
    logits = torch.randn(3, 5, requires_grad=True)
    losses = StepLosses([3, 3], loss_scale=1.0)
    with losses.recorder(0):
        first = F.cross_entropy(logits, torch.tensor([1, 2, 3]))
    with losses.recorder(1):
        empty = F.cross_entropy(logits, torch.full((3,), -100))  # 0/0 as a mean: NaN, as in one process
    losses.backward_loss(0, first).backward()
    losses.backward_loss(1, empty).backward()
    assert torch.isnan(empty) and torch.isfinite(logits.grad).all()
    ref, count = losses.normalizer()
    assert (ref, count) == (6.0, 3.0)  # gradients are then scaled by ref / count
    assert torch.allclose(losses.batch_loss([first, empty]), first.detach())


def test_an_unrecognised_loss_keeps_sample_weights() -> None:
    x = torch.randn(4, 2, requires_grad=True)
    losses = StepLosses([2, 2], loss_scale=0.5)
    with losses.recorder(0):
        loss = F.mse_loss(x, torch.zeros(4, 2)) + 1.0
    scaled = losses.backward_loss(0, loss)
    assert torch.allclose(scaled, loss * 0.25) and losses.normalizer() is None and losses.unrecognised_reason


class _Counting(torch.overrides.TorchFunctionMode):
    """A model's own mode, open around its layers."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def _micro_batch(placement: RecorderPlacement, layer_mean: bool = False, own_mode: bool = False) -> MeanLossRecorder:
    """One micro-batch's step: layers (an ``x.mean()`` in them, or under a mode of the model's own), the stage's
    call after the last layer, then the loss."""
    armed: list[Any] = []
    recorder = MeanLossRecorder()
    x = torch.randn(4, 3)
    with placement.recording(recorder, armed.append, "training_step"):
        with _Counting() if own_mode else contextlib.nullcontext():
            h = x * 2
            if layer_mean:
                h = h - h.mean()
            armed[0]()  # the last layer returned
        F.cross_entropy(h, torch.tensor([0, 1, 2, 0]))
    assert armed[-1] is None  # disarmed
    return recorder


def test_the_recorder_is_on_from_the_last_layer_once_that_is_shown_safe() -> None:
    placement = RecorderPlacement()
    first = _micro_batch(placement)
    assert placement.after_layers == {"training_step": True} and len(first.calls) == 1
    assert [float(c.count) for c in _micro_batch(placement).calls] == [4.0]  # the loss, recorded after the layers
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("case", ["layer_mean", "own_mode"])
def test_the_recorder_stays_on_for_the_whole_step_when_the_layers_need_it(case: str) -> None:
    placement = RecorderPlacement()
    _micro_batch(placement, **{case: True})
    assert placement.after_layers == {"training_step": False}
    recorder = _micro_batch(placement, **{case: True})
    assert len(recorder.calls) == (2 if case == "layer_mean" else 1)
    assert torch._C._len_torch_function_stack() == 0


def test_a_mode_opened_later_around_the_layers_turns_whole_step_recording_back_on() -> None:
    placement = RecorderPlacement()
    _micro_batch(placement)
    assert not _micro_batch(placement, own_mode=True).calls  # cannot be entered under the model's own mode
    assert placement.after_layers == {"training_step": False}
    assert len(_micro_batch(placement, own_mode=True).calls) == 1
    assert torch._C._len_torch_function_stack() == 0


# ---- exactness on processes ------------------------------------------------------------------------------------------


def _job(name: str, model: str, devices: int = 1, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "model_kwargs": KW, "devices": devices, **extra}


def _jobs() -> list[dict[str, Any]]:
    jobs = []
    for model in MODELS:
        jobs.append(_job(f"ref-{model}", model))
        for schedule in SCHEDULES:
            strategy = {"pipeline_parallel_size": 2, "schedule": schedule, "microbatches": 3}
            jobs.append(_job(f"pp2-{model}-{schedule}", model, 2, strategy=strategy))
    jobs.append(_job("ref-extras", "padded_hf_llama", **EXTRAS))
    jobs.append(_job("pp2-extras", "padded_hf_llama", 2, strategy={"pipeline_parallel_size": 2}, **EXTRAS))
    jobs.append(_job("ref-weighted", "weighted_loss_gpt"))
    jobs.append(_job("pp2-weighted", "weighted_loss_gpt", 2, strategy={"pipeline_parallel_size": 2, "microbatches": 3}))
    jobs.append(_job("tp2-padded_hf_llama", "padded_hf_llama", 2, strategy={"tensor_parallel_size": 2}))
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "loss_normalization", _jobs())


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("model", MODELS)
def test_padded_token_mean_matches_one_process(runs: Path, model: str, schedule: str) -> None:
    ref = load_result(runs, f"ref-{model}", 0)
    for rank in (0, 1):
        assert_matches_reference(ref, load_result(runs, f"pp2-{model}-{schedule}", rank))


@pytest.mark.distributed
@pytest.mark.parametrize(("job", "ref"), [("pp2-extras", "ref-extras"), ("pp2-weighted", "ref-weighted")])
def test_accumulation_validation_and_class_weights(runs: Path, job: str, ref: str) -> None:
    reference = load_result(runs, ref, 0)
    for rank in (0, 1):
        got = load_result(runs, job, rank)
        assert_matches_reference(reference, got)
        for key in ("val_loss", "train_loss"):  # the logged means are weighed the same way
            if key in reference["final_metrics"]:
                assert abs(got["final_metrics"][key] - reference["final_metrics"][key]) < 1e-5, key


@pytest.mark.distributed
def test_pure_tensor_parallelism_runs_one_micro_batch(runs: Path) -> None:
    ref = load_result(runs, "ref-padded_hf_llama", 0)
    for rank in (0, 1):
        assert_matches_reference(ref, load_result(runs, "tp2-padded_hf_llama", rank))


@pytest.mark.distributed
def test_data_parallel_pipelines_match_ddp_and_global_tokens_match_one_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    kw = {"batch_size": 4, "n": 32}
    pp = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2}
    ddp_job = {"name": "ddp", "model": "padded_gpt", "model_kwargs": kw, "devices": 2, "strategy": "ddp"}
    ddp_runs = run_jobs_or_fail(tmp_path_factory, "ddp", [ddp_job])  # its own processes: another world size
    jobs = [
        {"name": "dp2pp2", "model": "padded_gpt", "model_kwargs": kw, "devices": 4, "strategy": pp},
        {
            "name": "ref-union",
            "model": "padded_gpt",
            "model_kwargs": {**kw, "batch_size": 8},
            "replica_order": {"replicas": 2, "batch_size": 4},
        },
        {
            "name": "dp2pp2-global",
            "model": "padded_gpt",
            "model_kwargs": kw,
            "devices": 4,
            "strategy": {**pp, "loss_normalization": "global_tokens"},
        },
    ]
    runs = run_jobs_or_fail(tmp_path_factory, "dp_tokens", jobs)
    ddp = [load_result(ddp_runs, "ddp", r) for r in range(2)]
    for rank in range(4):  # ranks 0, 1: replica 0's stages; 2, 3: replica 1's
        got = load_result(runs, "dp2pp2", rank)
        assert_matches_reference(ddp[rank // 2], got)
        union = load_result(runs, "ref-union", 0)
        global_run = load_result(runs, "dp2pp2-global", rank)
        assert_matches_reference(union, {**global_run, "losses": union["losses"]})

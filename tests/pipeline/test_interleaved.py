"""Several (virtual) stages per rank, interleaved 1F1B, interleaved zero bubble and the V-shaped zero-bubble
schedule: the numbers of one process, with the rest of the strategy (uneven micro-batches, accumulation, clipping,
validation, tensor parallelism, 4 ranks), and schedule="auto" picking among them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_mp import ModelParallel
from tests.conftest import assert_matches_reference, load_result, run_harness, run_jobs_or_fail

pytestmark = pytest.mark.distributed

KW = {"batch_size": 6, "n": 20}
IL = {"pipeline_parallel_size": 2, "schedule": "interleaved_1f1b"}
EXTRAS = {"trainer": {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}, "limit_val_batches": 2,
          "val_check_interval": 2, "max_steps": 3}  # fmt: skip


def _pair(name: str, model: str, devices: int, strategy: dict, model_kwargs: dict | None = None, **extra: Any) -> list:
    kw = model_kwargs or KW
    return [
        {"name": f"ref-{name}", "model": model, "model_kwargs": kw, **extra},
        {"name": name, "model": model, "model_kwargs": kw, "devices": devices, "strategy": strategy, **extra},
    ]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    jobs = [
        # 3 virtual stages per rank (6 stages of one block), 3 micro-batches: not a multiple of the 2 ranks
        *_pair("v3-m3", "gpt", 2, {**IL, "virtual_stages": 3, "microbatches": 3}, {**KW, "layers": 6}),
        *_pair("extras", "hf_llama", 2, {**IL, "microbatches": 4}, **EXTRAS),
        *_pair("checkpointing", "hf_gpt2", 2, {**IL, "microbatches": 4, "activation_checkpointing": "always"}),
        # schedule="auto" compares the candidates on the measured layers and runs the one it picks
        *_pair("auto", "gpt", 2, {"schedule": "auto", "microbatches": 4, "balance": "uniform"}, {**KW, "layers": 8}),
        # interleaved zero bubble: interleaved 1F1B's order, the linear layers' weight gradients deferred
        *_pair(
            "zb-interleaved",
            "hf_llama",
            2,
            {"schedule": "zero_bubble", "virtual_stages": 2, "microbatches": 3},
            {**KW, "layers": 8},
            **EXTRAS,
        ),
        # the V shape: rank 0 runs blocks 0-1 and 6-7, rank 1 blocks 2-5; 3 micro-batches, with the extras
        *_pair(
            "v-shape", "hf_llama", 2, {"schedule": "zero_bubble_v", "microbatches": 3}, {**KW, "layers": 8}, **EXTRAS
        ),
    ]
    return run_jobs_or_fail(tmp_path_factory, "interleaved2", jobs)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    jobs = [
        *_pair("pp4", "gpt", 4, {**IL, "pipeline_parallel_size": 4, "microbatches": 4}, {**KW, "layers": 8}),
        *_pair("pp2tp2", "hf_gpt2", 4, {**IL, "tensor_parallel_size": 2, "microbatches": 4}),
        *_pair(
            "zb-pp4",
            "gpt",
            4,
            {"schedule": "zero_bubble", "virtual_stages": 2, "pipeline_parallel_size": 4, "microbatches": 4},
            {**KW, "layers": 8},
        ),
        *_pair(
            "v-pp4",
            "gpt",
            4,
            {"schedule": "zero_bubble_v", "pipeline_parallel_size": 4, "microbatches": 4},
            {**KW, "layers": 8},
        ),
    ]
    return run_jobs_or_fail(tmp_path_factory, "interleaved4", jobs)


@pytest.mark.parametrize("job", ["v3-m3", "extras", "checkpointing", "auto", "zb-interleaved", "v-shape"])
def test_interleaved_on_two_ranks(two_ranks: Path, job: str) -> None:
    ref = load_result(two_ranks, f"ref-{job}", 0)
    for rank in range(2):
        got = load_result(two_ranks, job, rank)
        assert_matches_reference(ref, got)
        if "val_loss" in ref["final_metrics"]:
            assert got["final_metrics"]["val_loss"] == pytest.approx(ref["final_metrics"]["val_loss"], abs=1e-5)


@pytest.mark.parametrize("job", ["pp4", "pp2tp2", "zb-pp4", "v-pp4"])
def test_interleaved_on_four_ranks(four_ranks: Path, job: str) -> None:
    ref = load_result(four_ranks, f"ref-{job}", 0)
    for rank in range(4):
        assert_matches_reference(ref, load_result(four_ranks, job, rank))


def test_virtual_stage_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="virtual_stages=2 needs schedule='interleaved_1f1b' or 'zero_bubble'"):
        ModelParallel(virtual_stages=2)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2 × virtual_stages=2"):
        ModelParallel(pipeline_parallel_size=2, schedule="interleaved_1f1b", balance=[2, 2])
    assert ModelParallel(schedule="interleaved_1f1b").virtual_stages == 2
    assert ModelParallel(schedule="zero_bubble").virtual_stages == 1
    assert ModelParallel(schedule="zero_bubble", virtual_stages=2).virtual_stages == 2  # interleaved zero bubble
    # 4 layers cannot make 2 ranks × 3 virtual stages: refused before training, naming the setting
    job = {"name": "few", "model": "gpt", "model_kwargs": KW, "devices": 2,
           "strategy": {**IL, "virtual_stages": 3, "balance": "uniform"}}  # fmt: skip
    proc = run_harness([job], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "virtual_stages=3" in proc.stderr and "6 stages" in proc.stderr

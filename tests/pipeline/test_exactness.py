"""Every layout trains to the numbers of one process: losses and parameters within 1e-5 (fp32, dropout off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, assert_matches_reference, load_result, run_harness, run_jobs_or_fail, run_script

pytestmark = pytest.mark.distributed

MODELS = ["sequential", "gpt", "hf_gpt2", "hf_llama", "hf_bert"]
SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zero_bubble_v", "none"]
# Batches of 6 samples in 4 micro-batches (sizes 2, 2, 1, 1), a last batch of 2, sequence length changing per batch.
MODEL_KW = {"batch_size": 6, "n": 20}
EXTRAS: dict[str, dict[str, Any]] = {
    # tied embedding + accumulation + clipping + a validation loop, on the two most common model shapes
    "accum_clip_val": {
        "trainer": {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05},
        "limit_val_batches": 2,
        "val_check_interval": 2,
        "max_steps": 3,
    },
}


def _pp2_jobs() -> list[dict[str, Any]]:
    jobs = []
    for model in MODELS:
        jobs.append({"name": f"ref-{model}", "model": model, "model_kwargs": MODEL_KW})
        for schedule in SCHEDULES:
            jobs.append(
                {
                    "name": f"pp2-{model}-{schedule}",
                    "model": model,
                    "model_kwargs": MODEL_KW,
                    "devices": 2,
                    "strategy": {"pipeline_parallel_size": 2, "schedule": schedule, "microbatches": 4},
                }
            )
    for model in ("gpt", "hf_llama"):
        extra = EXTRAS["accum_clip_val"]
        jobs.append({"name": f"ref-{model}-extras", "model": model, "model_kwargs": MODEL_KW, **extra})
        jobs.append(
            {
                "name": f"pp2-{model}-extras",
                "model": model,
                "model_kwargs": MODEL_KW,
                "devices": 2,
                "strategy": {"pipeline_parallel_size": 2, "microbatches": 3},
                **extra,
            }
        )
    for mode in ("reentrant", "non_reentrant"):  # Hugging Face gradient checkpointing inside the blocks
        kw = {**MODEL_KW, "checkpointing": mode}
        jobs.append({"name": f"ref-ckpt-{mode}", "model": "hf_gpt2", "model_kwargs": kw})
        jobs.append(
            {
                "name": f"pp2-ckpt-{mode}",
                "model": "hf_gpt2",
                "model_kwargs": kw,
                "devices": 2,
                "strategy": {"microbatches": 2},
            }
        )
    for model, balance in (("gpt", "time"), ("hf_llama", "memory"), ("hf_bert", "time")):
        jobs.append(
            {
                "name": f"pp2-{model}-{balance}",
                "model": model,
                "model_kwargs": MODEL_KW,
                "devices": 2,
                "strategy": {"balance": balance, "microbatches": 3},
            }
        )
    jobs.append({"name": "ref-frozen", "model": "frozen", "model_kwargs": MODEL_KW})
    jobs.append({"name": "pp2-frozen", "model": "frozen", "model_kwargs": MODEL_KW, "devices": 2, "strategy": {}})
    for name, extra in (("ref-predict", {}), ("pp2-predict", {"devices": 2, "strategy": {"microbatches": 3}})):
        jobs.append({"name": name, "model": "sequential", "model_kwargs": MODEL_KW, "predict": True, **extra})
    jobs.append(
        {"name": "pp2-gpt-registered", "model": "gpt", "model_kwargs": MODEL_KW, "devices": 2, "strategy": "registered"}
    )
    return jobs


@pytest.fixture(scope="module")
def pp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "pp2", _pp2_jobs())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("model", MODELS)
def test_pp2_matches_one_process(pp2: Path, model: str, schedule: str) -> None:
    ref = load_result(pp2, f"ref-{model}", 0)
    stages = [load_result(pp2, f"pp2-{model}-{schedule}", r) for r in range(2)]
    for got in stages:
        assert_matches_reference(ref, got)
        # the last stage's loss reaches every rank, and so do its logged keys
        assert got["final_metrics"]["train_loss"] == pytest.approx(ref["final_metrics"]["train_loss"], abs=1e-5)
    # each rank holds only its own stage; together they hold the whole model
    names = [set(s["params"]) for s in stages]
    assert names[0] | names[1] == set(ref["params"])
    assert len(names[0]) < len(ref["params"]) and len(names[1]) < len(ref["params"])


@pytest.mark.parametrize("model", ["gpt", "hf_llama"])
def test_accumulation_clipping_validation(pp2: Path, model: str) -> None:
    ref = load_result(pp2, f"ref-{model}-extras", 0)
    for rank in range(2):
        got = load_result(pp2, f"pp2-{model}-extras", rank)
        assert_matches_reference(ref, got)
        assert got["final_metrics"]["val_loss"] == pytest.approx(ref["final_metrics"]["val_loss"], abs=1e-5)


def test_tied_embedding_is_on_both_stages(pp2: Path) -> None:
    first, last = (load_result(pp2, "pp2-hf_gpt2-1f1b", r) for r in range(2))
    tied = "model.transformer.wte.weight"
    assert tied in first["params"] and tied in last["params"]
    assert (first["params"][tied] - last["params"][tied]).abs().max().item() == 0.0


def test_registered_name_uses_defaults(pp2: Path) -> None:
    ref = load_result(pp2, "ref-gpt", 0)
    for rank in range(2):
        assert_matches_reference(ref, load_result(pp2, "pp2-gpt-registered", rank))


# Replicas shuffle and mix samples, so every sequence has one length here (no padding inside a batch).
DP_KW = {**MODEL_KW, "batch_size": 4, "n": 32, "lengths": [8]}  # one epoch = the 4 steps


def _dp2_jobs() -> list[dict[str, Any]]:
    kw = DP_KW
    jobs = []
    for model in ("gpt", "hf_gpt2", "sequential"):
        jobs.append(
            {
                "name": f"dp2pp2-{model}",
                "model": model,
                "model_kwargs": kw,
                "devices": 4,
                "strategy": {
                    "pipeline_parallel_size": 2,
                    "data_parallel_size": 2,
                    "schedule": "1f1b",
                    "microbatches": 2,
                },
                "trainer": {"gradient_clip_val": 0.05},
            }
        )
    return jobs


@pytest.fixture(scope="module")
def dp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "dp2", _dp2_jobs())


@pytest.mark.parametrize("model", ["gpt", "hf_gpt2", "sequential"])
def test_dp2_pp2_matches_one_process(dp2: Path, tmp_path: Path, model: str) -> None:
    # One process sees, at each step, the union of the two replicas' batches, in the order Lightning's
    # DistributedSampler (shuffle=True, seed 0) gives them.
    ref_dir = tmp_path / "ref"
    kw = DP_KW
    job = {
        "name": "ref",
        "model": model,
        "model_kwargs": {**kw, "batch_size": 8},
        "trainer": {"gradient_clip_val": 0.05},
        "replica_order": {"replicas": 2, "batch_size": 4},
    }
    proc = run_harness([job], ref_dir)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ref = load_result(ref_dir, "ref", 0)
    results = [load_result(dp2, f"dp2pp2-{model}", r) for r in range(4)]
    # As under DDP, each replica reports the loss of its own shard: their mean is the one-process loss.
    replica_losses = [results[0]["losses"], results[2]["losses"]]  # ranks 0, 2: stage 0 of replicas 0, 1
    for got in results:
        assert_matches_reference(ref, {**got, "losses": [sum(v) / 2 for v in zip(*replica_losses)]})


def test_predict_returns_the_batches_predictions_on_every_rank(pp2: Path) -> None:
    ref = load_result(pp2, "ref-predict", 0)["predictions"]
    for rank in range(2):
        got = load_result(pp2, "pp2-predict", rank)["predictions"]
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert torch.equal(a["target"], b["target"])
            assert (a["logits"] - b["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_hf_gradient_checkpointing(pp2: Path, mode: str) -> None:
    ref = load_result(pp2, f"ref-ckpt-{mode}", 0)
    for rank in range(2):
        assert_matches_reference(ref, load_result(pp2, f"pp2-ckpt-{mode}", rank))


def test_standalone_pytorch_lightning_package(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    results = {}
    for devices in (1, 2):
        proc = run_script([str(ROOT / "tests" / "pl_harness.py"), str(tmp_path / str(devices)), str(devices)])
        assert proc.returncode == 0, proc.stderr[-5000:]
        results[devices] = [load_result(tmp_path, f"{devices}", r) for r in range(devices)]
    for got in results[2]:
        assert_matches_reference(results[1][0], got)


def test_frozen_first_stage_trains_the_rest(pp2: Path) -> None:
    ref = load_result(pp2, "ref-frozen", 0)
    for rank in range(2):
        assert_matches_reference(ref, load_result(pp2, "pp2-frozen", rank))


PP4_MODELS = ["gpt", "hf_llama", "hf_bert"]


def _pp4_jobs() -> list[dict[str, Any]]:
    jobs = []
    for model in PP4_MODELS:
        kw = {**MODEL_KW, "layers": 5}  # 5 layers on 4 stages: [2, 1, 1, 1]
        jobs.append({"name": f"ref-{model}", "model": model, "model_kwargs": kw})
        for schedule in ("gpipe", "1f1b", "zero_bubble"):
            jobs.append(
                {
                    "name": f"pp4-{model}-{schedule}",
                    "model": model,
                    "model_kwargs": kw,
                    "devices": 4,
                    "strategy": {"schedule": schedule, "microbatches": 4},
                }
            )
    return jobs


@pytest.fixture(scope="module")
def pp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "pp4", _pp4_jobs())


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zero_bubble"])
@pytest.mark.parametrize("model", PP4_MODELS)
def test_pp4_middle_stages_match_one_process(pp4: Path, model: str, schedule: str) -> None:
    ref = load_result(pp4, f"ref-{model}", 0)
    stages = [load_result(pp4, f"pp4-{model}-{schedule}", r) for r in range(4)]
    for got in stages:
        assert_matches_reference(ref, got)
    assert set().union(*(s["params"] for s in stages)) == set(ref["params"])


@pytest.mark.parametrize(("model", "balance"), [("gpt", "time"), ("hf_llama", "memory"), ("hf_bert", "time")])
def test_measured_balances_train_to_the_same_numbers(pp2: Path, model: str, balance: str) -> None:
    ref = load_result(pp2, f"ref-{model}", 0)
    for rank in range(2):
        assert_matches_reference(ref, load_result(pp2, f"pp2-{model}-{balance}", rank))


def test_measuring_the_first_batch_leaves_a_shuffled_order_alone(tmp_path: Path) -> None:
    """balance="time" takes a batch on rank 0 at set-up; a shuffling DataLoader must still give every stage, and a
    one-process run, the same order (the global RNG and a DataLoader's own generator are left as they were)."""
    jobs = []
    for shuffle in ("global", "generator"):
        kw = {"batch_size": 4, "n": 24, "lengths": [8], "shuffle": shuffle}
        jobs.append({"name": f"ref-{shuffle}", "model": "gpt", "model_kwargs": kw})
        strategy = {"pipeline_parallel_size": 2, "balance": "time", "microbatches": 2}
        jobs.append({"name": f"pp2-{shuffle}", "model": "gpt", "model_kwargs": kw, "devices": 2, "strategy": strategy})
    proc = run_harness(jobs, tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for shuffle in ("global", "generator"):
        ref = load_result(tmp_path, f"ref-{shuffle}", 0)
        for rank in range(2):
            assert_matches_reference(ref, load_result(tmp_path, f"pp2-{shuffle}", rank))


def test_torchmetrics_objects_give_the_one_process_epoch_values(tmp_path: Path) -> None:
    """Metrics logged as objects (F1 is not a mean over samples) reach every rank with the one-process epoch value."""
    kw = {"batch_size": 6, "n": 36, "lengths": [8], "lr": 0.05}
    common = {"model": "hf_bert_metrics", "model_kwargs": kw, "max_steps": 6, "limit_val_batches": 3}
    strategy = {"pipeline_parallel_size": 2, "microbatches": 3, "balance": "uniform"}
    jobs = [{"name": "ref", **common}, {"name": "pp2", **common, "devices": 2, "strategy": strategy}]
    proc = run_harness(jobs, tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ref = load_result(tmp_path, "ref", 0)["final_metrics"]
    for rank in range(2):
        got = load_result(tmp_path, "pp2", rank)["final_metrics"]
        for key in ("train_f1", "val_accuracy", "val_f1", "val_loss"):
            assert abs(got[key] - ref[key]) < 1e-6, (rank, key, got[key], ref[key])

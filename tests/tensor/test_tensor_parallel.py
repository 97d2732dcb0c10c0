"""Tensor parallelism: the automatic plan, and tp=2 / pp=2×tp=2 training to the numbers of one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mp.plan.discovery import discover_layers
from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.tensor.plan import plan_tensor_parallel
from lightning_mp.tensor.shard import ShardSpec
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail
from tests.models import make_model

MODELS = ["gpt", "example_gpt", "hf_gpt2", "hf_llama", "hf_bert"]
KW = {"batch_size": 6, "n": 20}
TP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "microbatches": 2}
PP2_TP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "microbatches": 3}
CLIP_VAL = {"trainer": {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}, "limit_val_batches": 2,
            "val_check_interval": 2, "max_steps": 3}  # fmt: skip
SEQUENCE_PARALLEL_MODELS = ["example_gpt", "hf_gpt2", "hf_llama", "hf_bert"]
USER_PLAN = {"net.0.0": "colwise", "net.1.0": "rowwise", "net.2.0": "colwise", "net.3.0": "rowwise"}


def _plan(model: str, size: int = 2, user: dict[str, str] | None = None) -> Any:
    module = make_model(model)
    return plan_tensor_parallel(module, discover_layers(module).container_name, size, user)


# ---- the plan (one process) ---------------------------------------------------------------------------------------


def test_gpt2_fused_qkv_is_split_part_by_part() -> None:
    plan = _plan("hf_gpt2")
    assert plan.styles["model.transformer.h.0.attn.c_attn"] == "colwise"
    assert plan.parts["model.transformer.h.0.attn.c_attn"] == (32, 32, 32)
    assert plan.styles["model.transformer.h.0.attn.c_proj"] == "rowwise"
    assert plan.styles["model.transformer.h.0.mlp.c_fc"] == "colwise"
    assert plan.styles["model.transformer.wte"] == "vocab" and plan.styles["model.lm_head"] == "head"
    assert plan.attributes["model.transformer.h.0.attn"] == {"num_heads": 1, "split_size": 16, "embed_dim": 16}
    spec = ShardSpec(1, plan.parts["model.transformer.h.0.attn.c_attn"], rank=1, size=2)
    assert spec.slices() == [(16, 16), (48, 16), (80, 16)]  # the second half of q, of k and of v


def test_bert_and_llama_plans() -> None:
    bert = _plan("hf_bert")
    layer = "model.bert.encoder.layer.0."
    assert [bert.styles[layer + n] for n in ("attention.self.query", "attention.output.dense")] == [
        "colwise",
        "rowwise",
    ]
    assert [bert.styles[layer + n] for n in ("intermediate.dense", "output.dense")] == ["colwise", "rowwise"]
    assert bert.attributes[layer + "attention.self"] == {"num_attention_heads": 1, "all_head_size": 16}
    assert "model.classifier" not in bert.styles and "model.bert.pooler.dense" not in bert.styles
    llama = _plan("hf_llama")
    assert llama.source.startswith("Hugging Face base_model_tp_plan")
    # one key/value head for two query heads: k and v stay whole, each rank's single query head uses them
    assert llama.styles["model.model.layers.0.self_attn.k_proj"] == "replicated_kv"
    assert llama.attributes["model.model.layers.0.self_attn"]["num_key_value_groups"] == 1


def test_multihead_attention_is_named_as_replicated() -> None:
    plan = _plan("gpt")
    assert plan.styles["blocks.0.mlp.0"] == "colwise" and plan.styles["blocks.0.mlp.2"] == "rowwise"
    assert "nn.MultiheadAttention" in plan.replicated["blocks.0.attn.out_proj"]
    assert "replicated: blocks.0.attn.out_proj" in plan.format()


def test_user_plan_overrides_and_errors() -> None:
    assert _plan("sequential").styles == {}  # no names to go by: nothing is split, and the plan says so
    plan = _plan("sequential", user=USER_PLAN)
    assert plan.styles == USER_PLAN
    with pytest.raises(ModelSplitError, match="matches no module"):
        _plan("sequential", user={"blocks.*.fc": "colwise"})
    with pytest.raises(ModelSplitError, match="is not a style"):
        _plan("sequential", user={"net.0.0": "columns"})
    with pytest.raises(ModelSplitError, match=r"net\.0\.1 \(Tanh\)"):
        _plan("sequential", user={"net.0.1": "colwise"})
    off = _plan("hf_gpt2", user={"model.transformer.h.*.mlp.c_fc": "replicate"})
    assert "model.transformer.h.0.mlp.c_fc" not in off.styles
    assert "model.transformer.h.0.mlp.c_proj" not in off.styles  # its row-wise partner stays whole too


def test_heads_that_do_not_divide_are_refused() -> None:
    with pytest.raises(ModelSplitError, match=r"h\.0\.attn\.c_attn computes 2\+2\+2 heads of 16 features"):
        _plan("hf_gpt2", size=4)


def test_sequence_parallel_needs_every_block_projection_split() -> None:
    with pytest.raises(ModelSplitError, match=r"sequence_parallel=True needs .* blocks\.0\.attn\.out_proj"):
        plan_tensor_parallel(make_model("gpt"), "blocks", 2, sequence_parallel=True)
    assert plan_tensor_parallel(make_model("hf_gpt2"), "model.transformer.h", 2, sequence_parallel=True).styles


def test_per_rank_parameter_memory_is_reported() -> None:
    import lightning_mp

    _, report = lightning_mp.dry_run(make_model("example_gpt"), devices=4, pipeline_parallel_size=2,
                                     tensor_parallel_size=2)  # fmt: skip
    for stage in report["tensor_parallel"]["parameters_per_rank"]:
        assert 0.5 <= stage["rank_mib"] / stage["stage_mib"] < 0.53  # norms and position embeddings stay whole
    assert "parameters per rank: stage 0:" in report["tensor_parallel_text"]


def test_a_tied_weight_is_split_for_both_users_or_refused() -> None:
    import torch.distributed as dist

    from lightning_mp.tensor.plan import apply_tensor_parallel
    from lightning_mp.tensor.shard import TPGroup

    model = make_model("gpt")
    plan = _plan("gpt", user={"head": "replicate"})  # the head is tied to the embedding, which stays split
    with pytest.raises(ModelSplitError, match=r"head \(Linear\) shares its parameter 'weight'"):
        apply_tensor_parallel(model, plan, TPGroup(dist.group.WORLD, 0, 2))  # (fails before any message)


def test_uneven_vocabulary_follows_torch_chunk() -> None:
    assert [ShardSpec(0, (5,), r, 2).slices() for r in range(2)] == [[(0, 3)], [(3, 2)]]
    full = torch.arange(10).view(5, 2)
    assert torch.equal(ShardSpec(0, (5,), 1, 2).shard(full), full[3:])


# ---- training (real processes) ------------------------------------------------------------------------------------


def _tp2_jobs() -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for model in MODELS:
        jobs.append({"name": f"ref-{model}", "model": model, "model_kwargs": KW})
        jobs.append({"name": f"tp2-{model}", "model": model, "model_kwargs": KW, "devices": 2, "strategy": TP2})
    jobs.append({"name": "ref-gpt-clip", "model": "gpt", "model_kwargs": KW, **CLIP_VAL})
    jobs.append({"name": "tp2-gpt-clip", "model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": TP2, **CLIP_VAL})
    jobs.append({"name": "ref-sequential", "model": "sequential", "model_kwargs": KW})
    user = {**TP2, "tensor_parallel_plan": USER_PLAN}
    jobs.append({"name": "tp2-sequential", "model": "sequential", "model_kwargs": KW, "devices": 2, "strategy": user})
    sequence = {**TP2, "sequence_parallel": True}
    for model in SEQUENCE_PARALLEL_MODELS:  # sequence lengths the 2 ranks can split (the example GPT drops one)
        kw = {**KW, "lengths": [9, 13, 7]} if model == "example_gpt" else KW
        jobs.append({"name": f"ref-{model}-sp", "model": model, "model_kwargs": kw})
        jobs.append({"name": f"tp2-{model}-sp", "model": model, "model_kwargs": kw, "devices": 2, "strategy": sequence})
    gathered = {**TP2, "loss_parallel": False}
    jobs.append({"name": "tp2-hf_gpt2-gathered", "model": "hf_gpt2", "model_kwargs": KW, "devices": 2,
                 "strategy": gathered})  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "tp2", _tp2_jobs())


def _assert_job_matches(out: Path, ref: str, job: str, ranks: int) -> None:
    reference = load_result(out, ref, 0)
    for rank in range(ranks):
        got = load_result(out, job, rank)
        assert_matches_reference(reference, got)


@pytest.mark.distributed
@pytest.mark.parametrize("model", MODELS)
def test_tp2_matches_one_process(tp2: Path, model: str) -> None:
    _assert_job_matches(tp2, f"ref-{model}", f"tp2-{model}", 2)
    both = [load_result(tp2, f"tp2-{model}", r)["params"] for r in range(2)]
    assert set(both[0]) == set(both[1]) == set(load_result(tp2, f"ref-{model}", 0)["params"])


@pytest.mark.distributed
@pytest.mark.parametrize("model", SEQUENCE_PARALLEL_MODELS)
def test_tp2_sequence_parallel_matches_one_process(tp2: Path, model: str) -> None:
    _assert_job_matches(tp2, f"ref-{model}-sp", f"tp2-{model}-sp", 2)


@pytest.mark.distributed
def test_tp2_with_accumulation_clipping_and_validation(tp2: Path) -> None:
    _assert_job_matches(tp2, "ref-gpt-clip", "tp2-gpt-clip", 2)
    ref = load_result(tp2, "ref-gpt-clip", 0)["final_metrics"]["val_loss"]
    assert load_result(tp2, "tp2-gpt-clip", 1)["final_metrics"]["val_loss"] == pytest.approx(ref, abs=1e-5)


@pytest.mark.distributed
def test_tp2_user_plan_and_gathered_logits(tp2: Path) -> None:
    _assert_job_matches(tp2, "ref-sequential", "tp2-sequential", 2)
    _assert_job_matches(tp2, "ref-hf_gpt2", "tp2-hf_gpt2-gathered", 2)


def _pp2_tp2_jobs() -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for model in MODELS:
        jobs.append({"name": f"ref-{model}", "model": model, "model_kwargs": KW})
        jobs.append({"name": f"pp2tp2-{model}", "model": model, "model_kwargs": KW, "devices": 4, "strategy": PP2_TP2})
    zero = {**PP2_TP2, "schedule": "zero_bubble", "loss_parallel": False}
    jobs.append({"name": "pp2tp2-zb", "model": "hf_gpt2", "model_kwargs": KW, "devices": 4, "strategy": zero})
    jobs.append({"name": "pp2tp2-ckpt", "model": "hf_gpt2", "model_kwargs": {"batch_size": 6, "n": 12},
                 "max_steps": 4, "devices": 4, "strategy": PP2_TP2, "checkpoint_every": 2})  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def pp2_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "pp2tp2", _pp2_tp2_jobs())


@pytest.mark.distributed
@pytest.mark.parametrize("model", MODELS)
def test_pp2_tp2_matches_one_process(pp2_tp2: Path, model: str) -> None:
    _assert_job_matches(pp2_tp2, f"ref-{model}", f"pp2tp2-{model}", 4)
    stages = [set(load_result(pp2_tp2, f"pp2tp2-{model}", r)["params"]) for r in (0, 2)]
    assert stages[0] | stages[1] == set(load_result(pp2_tp2, f"ref-{model}", 0)["params"])


@pytest.mark.distributed
def test_pp2_tp2_zero_bubble(pp2_tp2: Path) -> None:
    _assert_job_matches(pp2_tp2, "ref-hf_gpt2", "pp2tp2-zb", 4)


@pytest.mark.distributed
def test_pp2_tp2_checkpoint_loads_at_other_layouts(pp2_tp2: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Saved by 4 ranks (2 stages × 2 shards, GPT-2's fused q/k/v split part by part), resumed at tp=2 and by one
    plain process: the same numbers as the run that went on."""
    from lightning_mp.checkpoint.distributed import load_full_checkpoint

    step2 = str(pp2_tp2 / "pp2tp2-ckpt/ckpts/step=2.ckpt")
    common = {"model": "hf_gpt2", "model_kwargs": {"batch_size": 6, "n": 12}, "max_steps": 4, "resume_from": step2}
    out = run_jobs_or_fail(tmp_path_factory, "tp-resume", [
        {"name": "tp2", **common, "devices": 2, "strategy": TP2},
        {"name": "one", **common, "checkpoint_io": "distributed"},
    ])  # fmt: skip
    straight = [load_result(pp2_tp2, "pp2tp2-ckpt", r) for r in range(4)]
    full = {k: v for s in straight for k, v in s["params"].items()}
    ref = {"losses": straight[-1]["losses"][2:], "params": full}
    for job, ranks in (("tp2", 2), ("one", 1)):
        for rank in range(ranks):
            assert_matches_reference(ref, load_result(out, job, rank), atol=1e-6)
    saved = load_full_checkpoint(step2)["state_dict"]
    assert saved["model.transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # the full tensor, by its own name


# Replicas shuffle and mix samples, so every sequence has one length here (as in test_exactness's dp2 tests).
DP_KW = {"batch_size": 4, "n": 32, "lengths": [8]}


@pytest.mark.distributed
def test_dp2_pp2_tp2_on_8_processes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The full 3-D mesh: 2 replicas × 2 stages × 2 shards, against one process seeing both replicas' batches."""
    strategy = {**PP2_TP2, "data_parallel_size": 2, "microbatches": 2}
    out = run_jobs_or_fail(tmp_path_factory, "dp2pp2tp2", [
        {"name": "ref", "model": "hf_gpt2", "model_kwargs": {**DP_KW, "batch_size": 8},
         "replica_order": {"replicas": 2, "batch_size": 4}, "trainer": {"gradient_clip_val": 0.05}},
        {"name": "3d", "model": "hf_gpt2", "model_kwargs": DP_KW, "devices": 8, "strategy": strategy,
         "trainer": {"gradient_clip_val": 0.05}},
        {"name": "3d-full", "model": "hf_gpt2", "model_kwargs": DP_KW, "devices": 8,
         "strategy": {**strategy, "data_parallel_sharding": "full"}, "trainer": {"gradient_clip_val": 0.05}},
    ])  # fmt: skip
    ref = load_result(out, "ref", 0)
    for job in ("3d", "3d-full"):  # replicated, and ZeRO-3 (parameters, gradients, optimizer state sharded over dp)
        results = [load_result(out, job, r) for r in range(8)]
        replica_losses = [results[0]["losses"], results[4]["losses"]]  # each replica reports its own shard's loss
        for got in results:
            assert_matches_reference(ref, {**got, "losses": [sum(v) / 2 for v in zip(*replica_losses)]})

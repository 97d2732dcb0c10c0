"""Public model families under tensor parallelism: tp=2 and pp=2 × tp=2 train to the numbers of one process (SGD,
dropout off, 1e-5), or the self-check refuses the plan before the first step, naming the module. Phi-3, GPT-NeoX,
litgpt and the fused gate/up MLP are planned from their observed data flow (``tensor.flow``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_mp.plan.discovery import discover_layers
from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.tensor.plan import plan_tensor_parallel
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail
from tests.models import make_model
from tests.tensor.test_self_check import check_at_tp2

EXACT = [
    "hf_llama_lora",
    "hf_gemma",
    "hf_qwen3",
    "hf_qwen2",
    "hf_phi",
    "swiglu_names",
    "hf_phi3",
    "hf_gpt_neox",
    "litgpt",
    "fused_wi",
]
KW = {"batch_size": 6, "n": 20}
TP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "microbatches": 2}
PP2_TP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "microbatches": 3}


def _plan(model: str) -> Any:
    module = make_model(model)
    return plan_tensor_parallel(module, discover_layers(module).container_name, 2)


def test_lora_is_split_like_its_base_layer() -> None:
    plan = _plan("hf_llama_lora")
    attn = "model.base_model.model.model.layers.0.self_attn."
    assert plan.styles[attn + "q_proj"] == "colwise" and plan.styles[attn + "o_proj"] == "rowwise"
    assert not [n for n in plan.styles if "lora_" in n or "base_layer" in n]  # planned as one layer with the base
    assert not [n for n in plan.replicated if "lora_" in n or "base_layer" in n]


def test_an_mlp_is_recognised_by_its_shapes_whatever_its_names() -> None:
    plan = _plan("swiglu_names")
    assert [plan.styles[f"blocks.0.mlp.{n}"] for n in ("gate", "up", "down")] == ["colwise", "colwise", "rowwise"]


def test_a_fused_layout_the_names_cannot_tell_is_left_to_the_data_flow() -> None:
    plan = _plan("litgpt")  # qkv has n_head + 2 * n_query_groups heads: not three equal parts
    assert "gpt.transformer.h.0.attn.qkv" not in plan.styles
    assert "data flow" in plan.replicated["gpt.transformer.h.0.attn.qkv"]


def test_hugging_face_styles_are_mapped_or_refused_by_name() -> None:
    phi3 = _plan("hf_phi3")  # colwise_gather_output / rowwise_split_input: the roles, the layout from the data flow
    assert phi3.styles["model.model.layers.0.mlp.gate_up_proj"] == "colwise"
    assert phi3.styles["model.model.layers.0.mlp.down_proj"] == "rowwise"
    module = make_model("hf_llama")
    module.model.config.base_model_tp_plan = {"layers.*.mlp": "moe_tp_experts"}
    container = discover_layers(module).container_name
    with pytest.raises(
        ModelSplitError, match=r"model\.model\.layers\.\*\.mlp with the Hugging Face style 'moe_tp_experts'"
    ):
        plan_tensor_parallel(module, container, 2)
    placed = plan_tensor_parallel(module, container, 2, {"model.model.layers.*.mlp": "replicate"})
    assert "model.model.layers.0.mlp" in placed.replicated


def _observed(model: str) -> Any:
    """The data-flow plan of the model's first block, observed on its first batch in one process."""
    import torch

    from lightning_mp.tensor.flow import observe_block
    from lightning_mp.tensor.self_check import _float_inputs, capture_inputs

    module = make_model(model)
    block = discover_layers(module).container_name + ".0"
    batch = next(iter(module.train_dataloader()))
    captured, _ = capture_inputs(module, [block], lambda: module.training_step(batch, 0))
    whole = dict(module.named_modules())[block]
    return observe_block(whole, _float_inputs(captured[block], torch.device("cpu")), 2, block)


def test_the_data_flow_finds_pairs_layouts_and_sizes_whatever_the_names() -> None:
    phi3 = _observed("hf_phi3")  # o_proj registered before qkv_proj; the query width read from the shared config
    assert phi3.styles["self_attn.qkv_proj"] == "colwise" and phi3.styles["self_attn.o_proj"] == "rowwise"
    assert phi3.runs["self_attn.qkv_proj"][1] == ((16, 16), (48, 16), (80, 16))  # the second half of q, k, v
    assert phi3.runs["mlp.gate_up_proj"][0] == ((0, 32), (64, 32))  # gate and up, cut by chunk(2)
    assert phi3.attributes["self_attn"] == {"config.num_attention_heads": 2, "num_key_value_heads": 2}
    neox = _observed("hf_gpt_neox")  # q, k, v interleaved per head: a rank's heads are one contiguous run
    assert neox.runs["attention.query_key_value"] == (((0, 48),), ((48, 48),)) and not neox.attributes
    lit = _observed("litgpt")  # [q | k | v] with 4 query heads and 2 groups; head counts in the shared config
    assert lit.runs["attn.qkv"][0] == ((0, 16), (32, 8), (48, 8))
    assert lit.attributes["attn"] == {"config.n_head": 2, "config.n_query_groups": 1}


def _jobs(strategy: dict[str, Any], tag: str, devices: int) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for model in EXACT:
        jobs.append({"name": f"ref-{model}", "model": model, "model_kwargs": KW})
        jobs.append({"name": f"{tag}-{model}", "model": model, "model_kwargs": KW, "devices": devices,
                     "strategy": strategy})  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "families-tp2", _jobs(TP2, "tp2", 2))


@pytest.fixture(scope="module")
def pp2_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "families-pp2tp2", _jobs(PP2_TP2, "pp2tp2", 4))


@pytest.mark.distributed
@pytest.mark.parametrize("model", EXACT)
def test_tp2_matches_one_process(tp2: Path, model: str) -> None:
    reference = load_result(tp2, f"ref-{model}", 0)
    for rank in range(2):
        assert_matches_reference(reference, load_result(tp2, f"tp2-{model}", rank))


@pytest.mark.distributed
@pytest.mark.parametrize("model", EXACT)
def test_pp2_tp2_matches_one_process(pp2_tp2: Path, model: str) -> None:
    reference = load_result(pp2_tp2, f"ref-{model}", 0)
    for rank in range(4):
        assert_matches_reference(reference, load_result(pp2_tp2, f"pp2tp2-{model}", rank))
    stages = [set(load_result(pp2_tp2, f"pp2tp2-{model}", r)["params"]) for r in (0, 2)]
    assert stages[0] | stages[1] == set(reference["params"])


@pytest.mark.distributed
def test_t5_is_refused_naming_the_block(tmp_path: Path) -> None:
    """T5 (its encoder's blocks outside the planned container, its relative position bias per head handed from
    block to block) would train to different numbers: the self-check refuses it."""
    got = check_at_tp2(tmp_path, [("hf_t5", None, "error")])
    error = got["hf_t5/error"]["error"]
    assert "tensor-parallel self-check: model.decoder.block.0 (T5Block)" in error and "'replicate'}" in error, error

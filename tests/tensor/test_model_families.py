"""Public model families under tensor parallelism: tp=2 and pp=2 × tp=2 train to the numbers of one process (SGD,
dropout off, 1e-5), or the self-check refuses the plan before the first step, naming the module."""

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

EXACT = ["hf_llama_lora", "hf_gemma", "hf_qwen3", "swiglu_names"]
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


def test_litgpt_grouped_qkv_is_refused_at_planning() -> None:
    with pytest.raises(ModelSplitError, match=r"gpt\.transformer\.h\.0\.attn\.qkv looks like a fused projection"):
        _plan("litgpt")


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
def test_families_the_plan_gets_wrong_are_refused_naming_the_block(tmp_path: Path) -> None:
    """Phi-3 (output projection registered before the fused q/k/v), GPT-NeoX (q/k/v interleaved per head) and T5
    (output projections named ``o``) would train to different numbers: the self-check refuses them."""
    got = check_at_tp2(tmp_path, [("hf_phi3", None, "error"), ("hf_gpt_neox", None, "error"), ("hf_t5", None, "error")])
    expected = {
        "hf_phi3": "model.model.layers.0 (Phi3DecoderLayer)",
        "hf_gpt_neox": "model.gpt_neox.layers.0 (GPTNeoXLayer)",
        "hf_t5": "model.decoder.block.0 (T5Block)",
    }
    for model, block in expected.items():
        error = got[f"{model}/error"]["error"]
        assert f"tensor-parallel self-check: {block}" in error and "'replicate'}" in error, error

"""Finding the layers of unmodified models, and the plan built from them (no processes)."""

from __future__ import annotations

import pytest

from lightning_mp import ModelSplitError, build_plan
from lightning_mp.plan.discovery import discover_layers
from tests.models import make_model


@pytest.mark.parametrize(
    ("name", "container", "pre", "post"),
    [
        ("gpt", "blocks", ["wte", "wpe"], ["ln_f", "head"]),
        (
            "hf_gpt2",
            "model.transformer.h",
            ["model.transformer.wte", "model.transformer.wpe"],
            ["model.transformer.ln_f", "model.lm_head"],
        ),
        ("hf_llama", "model.model.layers", ["model.model.embed_tokens"], ["model.model.norm", "model.lm_head"]),
        ("hf_bert", "model.bert.encoder.layer", None, ["model.bert.pooler.dense", "model.classifier"]),
        ("sequential", "net", [], []),
    ],
)
def test_discovers_the_block_container(name: str, container: str, pre: list | None, post: list) -> None:
    found = discover_layers(make_model(name))
    assert found.container_name == container
    assert found.num_layers >= 4
    if pre is not None:
        assert found.pre == pre
    assert found.post == post


def test_explicit_layers_override() -> None:
    found = discover_layers(make_model("gpt"), layers="blocks")
    assert found.layer_names[0] == "blocks.0"


def test_params_balance_accounts_for_head_and_embedding() -> None:
    model = make_model("gpt", layers=6)
    plan = build_plan(model, 2, "params")
    assert sum(plan.balance) == 6 and min(plan.balance) >= 1
    text = plan.format()
    assert "stage 0" in text and "before: wte, wpe" in text and "after: ln_f, head" in text


def test_errors_name_the_setting() -> None:
    with pytest.raises(ModelSplitError, match="found no repeated blocks"):
        build_plan(make_model("unsplittable"), 2)
    with pytest.raises(ModelSplitError, match=r"does not name a submodule.*Candidates: 'blocks'"):
        build_plan(make_model("gpt"), 2, layers="transformer.h")
    with pytest.raises(ModelSplitError, match="4 layers but pipeline_parallel_size=8"):
        build_plan(make_model("gpt"), 8)

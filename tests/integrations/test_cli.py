"""LightningCLI users: ``--trainer.strategy=lightning_mp.ModelParallel --trainer.strategy.<argument>=...`` builds the
strategy with every constructor argument typed as the constructor says (no processes, no training)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from lightning_mp import ModelParallel

pytest.importorskip("jsonargparse")

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel


def _strategy(*arguments: str) -> Any:
    args = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.logger=false", *arguments]
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=args, save_config_callback=None)
    return cli.trainer.strategy


def test_the_cli_builds_the_strategy_from_its_class_path() -> None:
    strategy = _strategy(
        "--trainer.strategy=lightning_mp.ModelParallel",
        "--trainer.strategy.pipeline_parallel_size=2",
        "--trainer.strategy.schedule=gpipe",
        "--trainer.strategy.microbatches=4",
        "--trainer.strategy.balance=[3,2]",
        "--trainer.strategy.timeout=60",
        "--trainer.strategy.max_memory=2GiB",
        "--trainer.strategy.rebalance_every=epoch",
        "--trainer.strategy.activation_checkpointing=except_last",
        "--trainer.strategy.predictions=rank0",
    )
    assert isinstance(strategy, ModelParallel)
    o = strategy.options
    assert (o.pipeline_parallel_size, o.schedule, o.microbatches, o.balance) == (2, "gpipe", 4, [3, 2])
    assert (o.timeout, o.max_memory, o.rebalance_every) == (timedelta(seconds=60), 2 * 2**30, "epoch")
    assert (o.activation_checkpointing, o.predictions) == ("except_last", "rank0")


def test_the_cli_passes_tensor_parallel_arguments_and_the_registered_name() -> None:
    strategy = _strategy(
        "--trainer.strategy=lightning_mp.ModelParallel",
        "--trainer.strategy.tensor_parallel_size=2",
        "--trainer.strategy.pipeline_parallel_size=1",
        '--trainer.strategy.tensor_parallel_plan={"blocks.*.mlp.0": "colwise"}',
        "--trainer.strategy.sequence_parallel=true",
        "--trainer.strategy.balance=uniform",
    )
    o = strategy.options
    assert (o.tensor_parallel_size, o.tensor_parallel_plan) == (2, {"blocks.*.mlp.0": "colwise"})
    assert o.sequence_parallel and o.balance == "uniform"
    assert isinstance(_strategy("--trainer.strategy=model_parallel"), ModelParallel)


def test_a_bad_value_on_the_cli_names_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # outside the argument's Literal type: refused by the parser, naming the key
        _strategy("--trainer.strategy=lightning_mp.ModelParallel", "--trainer.strategy.schedule=zero")
    assert 'Parser key "schedule"' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"microbatches=0 is invalid: allowed: a positive int or auto"):
        _strategy("--trainer.strategy=lightning_mp.ModelParallel", "--trainer.strategy.microbatches=0")

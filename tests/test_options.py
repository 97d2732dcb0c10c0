"""The strategy's constructor, its layout arithmetic and its registration (no processes)."""

from __future__ import annotations

import lightning as L
import pytest

import lightning_mp
from lightning_mp import LayoutError, ModelParallel, ParallelLayout


def test_registered_in_lightning_and_pytorch_lightning() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert "model_parallel" in StrategyRegistry
    trainer = L.Trainer(strategy="model_parallel", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ModelParallel)
    pl = pytest.importorskip("pytorch_lightning")
    trainer = pl.Trainer(strategy="model_parallel", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy).__name__ == "ModelParallel"
    assert isinstance(trainer.strategy, pl.strategies.ParallelStrategy)


def test_tensor_parallel_options_are_checked() -> None:
    assert ModelParallel(
        tensor_parallel_size=2, tensor_parallel_plan={"blocks.*.mlp.0": "colwise"}
    ).options.loss_parallel
    with pytest.raises(LayoutError, match="tensor_parallel_size=0"):
        ModelParallel(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_plan"):
        ModelParallel(tensor_parallel_size=2, tensor_parallel_plan=["colwise"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rebalance"):
        ModelParallel(tensor_parallel_size=2, rebalance=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "zero"}, "schedule='zero' is invalid: allowed: auto"),
        ({"microbatches": 0}, "microbatches=0"),
        ({"balance": "fastest"}, "balance='fastest' is invalid: allowed: uniform"),
        ({"start_method": "x"}, "start_method"),
        (
            {"pipeline_parallel_size": 2, "balance": [1, 2, 3]},
            r"balance=\[1, 2, 3\] has 3 entries but pipeline_parallel",
        ),
        ({"rebalance_every": 0}, "rebalance_every=0 is invalid"),
        ({"rebalance_every": "weekly"}, "rebalance_every='weekly' is invalid"),
        ({"pipeline_parallel_size": 2, "balance": [4, 0]}, r"balance=\[4, 0\] gives stage 1 no layers"),
        ({"balance": [0, 3, 3]}, r"balance=\[0, 3, 3\] gives stage 0 no layers.*e\.g\. balance=\[2, 2, 2\]"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelParallel(**kwargs)


def test_layout_resolution() -> None:
    assert ParallelLayout.resolve(4) == ParallelLayout(1, 4, 1)
    assert ParallelLayout.resolve(4, dp=2) == ParallelLayout(2, 2, 1)
    assert ParallelLayout.resolve(8, pp=2, tp=2) == ParallelLayout(2, 2, 2)
    layout = ParallelLayout(2, 2, 2)
    assert [layout.coords(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    assert all(layout.rank_of(*layout.coords(r)) == r for r in range(8))
    with pytest.raises(LayoutError, match=r"data_parallel_size\(2\) × pipeline_parallel_size\(3\)"):
        ParallelLayout.resolve(4, dp=2, pp=3)
    with pytest.raises(LayoutError, match="not divisible"):
        ParallelLayout.resolve(6, pp=4)
    with pytest.raises(LayoutError, match="positive int"):
        ParallelLayout.resolve(4, pp=0)


def test_version() -> None:
    assert lightning_mp.__version__

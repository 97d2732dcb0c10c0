"""Registers the strategy name "model_parallel" with Lightning, so ``Trainer(strategy="model_parallel")`` works."""

from __future__ import annotations

import importlib.util


def register() -> None:
    """Register in ``lightning.pytorch``'s registry, and in ``pytorch_lightning``'s when that package is installed."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_mp.strategy import ModelParallel

    if ModelParallel.strategy_name not in StrategyRegistry:
        ModelParallel.register_strategies(StrategyRegistry)
    if importlib.util.find_spec("pytorch_lightning") is not None:
        from lightning_mp.integrations.compat import register_pytorch_lightning

        register_pytorch_lightning()

"""The same strategy for the standalone ``pytorch_lightning`` package, whose classes are a separate hierarchy.

``pytorch_lightning`` mirrors ``lightning.pytorch`` module for module, so its strategy is built from the very source
of :mod:`lightning_mp.strategy` with the package names swapped: one implementation, two class hierarchies.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

_MODULE_NAME = "lightning_mp._pytorch_lightning_strategy"


def pytorch_lightning_strategy_module() -> ModuleType:
    """``lightning_mp.strategy`` compiled against ``pytorch_lightning`` and ``lightning_fabric``."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.find_spec("lightning_mp.strategy")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    source = source.replace("lightning.pytorch", "pytorch_lightning").replace("lightning.fabric", "lightning_fabric")
    module = ModuleType(_MODULE_NAME)
    module.__file__ = spec.origin
    sys.modules[_MODULE_NAME] = module
    exec(compile(source, spec.origin, "exec"), module.__dict__)
    return module


def register_pytorch_lightning() -> None:
    """Register "model_parallel" in ``pytorch_lightning``'s strategy registry."""
    from pytorch_lightning.strategies import StrategyRegistry

    cls = pytorch_lightning_strategy_module().ModelParallel
    if cls.strategy_name not in StrategyRegistry:
        cls.register_strategies(StrategyRegistry)

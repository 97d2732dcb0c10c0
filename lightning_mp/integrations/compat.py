"""The same strategy for the standalone ``pytorch_lightning`` package, whose classes are a separate hierarchy.

``pytorch_lightning`` mirrors ``lightning.pytorch`` module for module, so its strategy is built from the very source
of :mod:`lightning_mp.strategy` with the package names swapped: one implementation, two class hierarchies.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

_PREFIX = "lightning_mp._pytorch_lightning_"
_REWRITTEN = ("runtime.launcher", "strategy")  # the modules that subclass Lightning classes, dependencies first


def pytorch_lightning_strategy_module() -> ModuleType:
    """``lightning_mp.strategy`` compiled against ``pytorch_lightning`` and ``lightning_fabric``."""
    for name in _REWRITTEN:
        _rewritten(name)
    return sys.modules[_PREFIX + "strategy"]


def _rewritten(name: str) -> ModuleType:
    alias = _PREFIX + name.replace(".", "_")
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.find_spec(f"lightning_mp.{name}")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    source = source.replace("lightning.pytorch", "pytorch_lightning").replace("lightning.fabric", "lightning_fabric")
    for other in _REWRITTEN:
        source = source.replace(f"from lightning_mp.{other} import", f"from {_PREFIX}{other.replace('.', '_')} import")
    module = ModuleType(alias)
    module.__file__ = spec.origin
    sys.modules[alias] = module
    exec(compile(source, spec.origin, "exec"), module.__dict__)
    return module


def register_pytorch_lightning() -> None:
    """Register "model_parallel" in ``pytorch_lightning``'s strategy registry."""
    from pytorch_lightning.strategies import StrategyRegistry

    cls = pytorch_lightning_strategy_module().ModelParallel
    if cls.strategy_name not in StrategyRegistry:
        cls.register_strategies(StrategyRegistry)

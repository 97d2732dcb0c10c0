"""Tiny models of public families (Hugging Face configs, litgpt, PEFT), built offline, one module per family group.

Each module holds a ``MODELS`` dict of name -> factory (a LightningModule class or callable taking ``**kw``), merged
into ``tests.models.MODELS`` so that the harness can run them by name."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def all_models() -> dict[str, Any]:
    """Every zoo module's ``MODELS``, merged."""
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(__path__):
        models = getattr(importlib.import_module(f"{__name__}.{info.name}"), "MODELS", {})
        clash = sorted(set(models) & set(found))
        if clash:
            raise ValueError(f"tests/zoo/{info.name}.py registers {clash}, already registered by another zoo module")
        found.update(models)
    return found

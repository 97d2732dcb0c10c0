"""Building Hugging Face models for the recipes without console noise that says nothing to act on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block, transformers logs errors only and shows no weight-loading progress bar.

    Its load report names the new classification head as "MISSING" (the recipes add that head on purpose) and its
    generation-config notes concern ``generate()``, which the recipes do not call.
    """
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def build(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` (``from_pretrained``, ``from_config``) quietly and in training mode
    (``from_pretrained``
    returns a model in eval mode, which Lightning would warn about at the start of training)."""
    with quiet_transformers():
        return factory(*args, **kwargs).train()

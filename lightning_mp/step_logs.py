"""``self.log`` under pipelining: capture the calls of each micro-batch, combine them, replay them on every rank.

Only the last stage runs the loss and the user's ``self.log`` calls, once per micro-batch. The calls are captured
instead of logged, combined into one value per key (the mean over micro-batches weighted by their sizes: the value
one process would log for the whole batch when the logged quantity is a per-sample mean, such as a loss), sent to
the other stages, and replayed through the real ``LightningModule.log`` on every rank. So every rank logs the same
keys (``sync_dist=True`` then reduces over the data-parallel replicas only, as the pipeline copies agree), and the
progress bar and loggers on global rank 0, which runs the first stage, see the real values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class LogRecords:
    """The ``self.log`` calls captured during the micro-batches of one step, in call order."""

    calls: list[tuple[str, Any, dict[str, Any], float]] = field(default_factory=list)

    def combined(self) -> dict[str, tuple[Any, dict[str, Any]]]:
        """One (value, kwargs) per key: the weighted mean of its values, with the last call's arguments."""
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        kwargs_of: dict[str, dict[str, Any]] = {}
        for name, value, kwargs, weight in self.calls:
            sums[name] = sums.get(name, 0.0) + weight * _to_float(value, name)
            weights[name] = weights.get(name, 0.0) + weight
            kwargs_of[name] = kwargs
        return {name: (sums[name] / weights[name], kwargs_of[name]) for name in sums}


def _to_float(value: Any, name: str) -> float:
    from torchmetrics import Metric

    if isinstance(value, Metric):
        cache = getattr(value, "_forward_cache", None)
        if cache is None:
            raise NotImplementedError(
                f"self.log({name!r}, metric) with a torchmetrics Metric that was only update()d: under pipeline"
                " parallelism call the metric (metric(preds, target)) in the step, or log metric.compute() at the"
                " epoch end yourself."
            )
        value = cache
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"self.log({name!r}, ...) needs a scalar, got a tensor of shape {tuple(value.shape)}.")
        return float(value.detach().double().item())
    return float(value)


@contextmanager
def capture_logs(module: Any, records: LogRecords, weight: float) -> Iterator[None]:
    """Within the block, ``module.log`` (and so ``log_dict``) appends to ``records`` instead of logging."""

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError("lightning-mp: pass the options of self.log by keyword (prog_bar=True, ...)")
        records.calls.append((name, value, kwargs, weight))

    module.__dict__["log"] = log
    try:
        yield
    finally:
        module.__dict__.pop("log", None)


def replay_logs(module: Any, combined: dict[str, tuple[Any, dict[str, Any]]], batch_size: int) -> None:
    """Log the combined values through the real ``LightningModule.log``."""
    for name, (value, kwargs) in combined.items():
        kwargs = dict(kwargs)
        kwargs.setdefault("batch_size", batch_size)
        module.log(name, torch.tensor(value, dtype=torch.float32), **kwargs)

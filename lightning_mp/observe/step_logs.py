"""``self.log`` under pipelining: capture the calls of each micro-batch, combine them, replay them on every rank.

Only the last stage runs the loss and the user's ``self.log`` calls, once per micro-batch. The calls are captured
instead of logged, combined into one value per key (the mean over micro-batches weighted by their sizes: the value
one process would log for the whole batch when the logged quantity is a per-sample mean, such as a loss), sent to
the other stages, and replayed through the real ``LightningModule.log`` on every rank. So every rank logs the same
keys (``sync_dist=True`` then reduces over the data-parallel replicas only, as the pipeline copies agree), and the
progress bar and loggers on global rank 0, which runs the first stage, see the real values.

A torchmetrics ``Metric`` logged as an object travels as its accumulated state (a :class:`MetricState`): every rank
loads it into its own copy of the metric and logs the object, so the epoch value Lightning computes is the one of
one process (the metric over every sample of the epoch), and the same on every rank. Its step value is the
sample-weighted mean over the micro-batches (exact for means such as accuracy, close for F1 or perplexity). States
are sent whole each step: cheap for the usual fixed-size states, growing through the epoch for "cat" states.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class MetricState:
    """A logged torchmetrics ``Metric``: where it lives in the module, its accumulated state, its step value."""

    path: str
    states: dict[str, Any]
    update_count: int
    step_value: float

    @classmethod
    def of(cls, metric: Any, path: str, step_value: float) -> MetricState:
        states = {name: _detached(getattr(metric, name)) for name in metric._defaults}
        return cls(path, states, metric._update_count, step_value)

    def load_into(self, module: Any) -> Any:
        """Give ``module``'s metric at ``path`` this state; return the metric."""
        metric = module.get_submodule(self.path)
        device = metric.device
        for name, value in self.states.items():
            setattr(metric, name, [v.to(device) for v in value] if isinstance(value, list) else value.to(device))
        metric._update_count = self.update_count
        metric._computed = None
        metric._forward_cache = torch.tensor(self.step_value)
        return metric


@contextmanager
def preserved_metric_states(module: Any) -> Iterator[None]:
    """Leave every torchmetrics ``Metric`` in ``module`` as it was: a step run at set-up (to measure or observe the
    model) must not count in an epoch's metric."""
    from torchmetrics import Metric

    metrics = [(path, m) for path, m in module.named_modules() if isinstance(m, Metric)]
    saved = [(MetricState.of(m, path, 0.0), m._computed, m._forward_cache) for path, m in metrics]
    try:
        yield
    finally:
        for state, computed, cache in saved:
            metric = state.load_into(module)
            metric._computed, metric._forward_cache = computed, cache


@dataclass
class LogRecords:
    """The ``self.log`` calls captured during the micro-batches of one step, in call order."""

    calls: list[tuple[str, Any, dict[str, Any], float]] = field(default_factory=list)

    def combined(self, module: Any = None) -> dict[str, tuple[Any, dict[str, Any]]]:
        """One (value, kwargs) per key: the weighted mean of its values, with the last call's arguments; a metric
        of ``module`` logged as an object becomes its :class:`MetricState`."""
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        kwargs_of: dict[str, dict[str, Any]] = {}
        metrics: dict[str, Any] = {}
        for name, value, kwargs, weight in self.calls:
            weight = float(weight)
            if weight:  # a mean over nothing (every token of the micro-batch ignored) adds nothing
                sums[name] = sums.get(name, 0.0) + weight * _to_float(value, name)
            weights[name] = weights.get(name, 0.0) + weight
            kwargs_of[name] = kwargs
            if _is_metric(value):
                metrics[name] = value
        paths = {id(m): path for path, m in module.named_modules()} if module is not None and metrics else {}
        out: dict[str, tuple[Any, dict[str, Any]]] = {}
        for name in sums:
            value: Any = sums.get(name, 0.0) / weights[name] if weights[name] else float("nan")
            if id(metrics.get(name)) in paths:
                value = MetricState.of(metrics[name], paths[id(metrics[name])], value)
            out[name] = (value, kwargs_of[name])
        return out


def _is_metric(value: Any) -> bool:
    from torchmetrics import Metric

    return isinstance(value, Metric)


def _detached(value: Any) -> Any:
    if isinstance(value, list):
        return [v.detach().clone() for v in value]
    return value.detach().clone()


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
def capture_logs(module: Any, records: LogRecords, weight: float | Callable[[Any], Any]) -> Iterator[None]:
    """Within the block, ``module.log`` (and so ``log_dict``) appends to ``records`` instead of logging; each value
    with its ``weight`` in the step's mean (a number, or a function of the logged value)."""

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError("lightning-mp: pass the options of self.log by keyword (prog_bar=True, ...)")
        records.calls.append((name, value, kwargs, weight(value) if callable(weight) else weight))

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
        if isinstance(value, MetricState):
            module.log(name, value.load_into(module), **kwargs)
        else:
            module.log(name, torch.tensor(value, dtype=torch.float32), **kwargs)


def log_step_values(module: Any, values: dict[str, float], batch_size: int) -> None:
    """The strategy's own per-step values (``pipeline/...``), as ``self.log(on_step=True, on_epoch=False)`` reports
    them: in ``trainer.callback_metrics`` (for callbacks such as ``EarlyStopping``) and, at the trainer's logging
    cadence, in its loggers under the step Lightning gives the step's own values.

    Why not ``self.log``: each of its calls costs ~3 ms in Lightning 2.x (it moves a torchmetrics state to the
    device, walking its attributes), ~30 ms per step for a pipeline's dozen values; this writes them in one go. Where
    the trainer's internals are not as expected, it falls back to ``self.log``."""
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if connector is None or not hasattr(connector, "_callback_metrics") or not hasattr(loop, "_should_accumulate"):
        for name, value in values.items():
            module.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)
        return
    tensors = {name: torch.tensor(float(value)) for name, value in values.items()}
    connector._callback_metrics.update(tensors)
    # Lightning's own test at the batch's end (nothing changes it in between): not within an accumulation window,
    # and a step of the logging cadence; the step and epoch recorded are those it gives the step's own values
    if trainer.loggers and not loop._should_accumulate() and (connector.should_update_logs or trainer.fast_dev_run):
        connector.log_metrics(tensors)


SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level"


def silence_sync_dist_advice() -> None:
    """Without data parallelism every rank logs the same replayed values, so Lightning's advice to log them with
    ``sync_dist=True`` does not apply (Lightning drops ``sync_dist`` anyway when the strategy reports no data
    parallelism, then warns that the values were not synchronised): filter that one warning."""
    warnings.filterwarnings("ignore", message=SYNC_DIST_ADVICE)

"""The model summary and progress bar of a split model: the whole model, stage by stage, and the real step count.

Lightning's ``ModelSummary`` walks the module of the rank that prints it: under pipelining that is one stage (the
other stages' modules show as stand-ins, their parameters missing, FLOPs 0). :class:`SplitModelSummary` prints the
whole model instead: each stage's layers and parameters (counted on the unsplit model when the plan was made) and
which ranks hold it, with the parameters each holds. :class:`StepProgressBar` is Lightning's rich progress bar
without the ``Epoch 0/-2`` of a run bounded by ``max_steps`` and without the logger's version number (``v_num``).

:func:`use_split_model_callbacks` puts them in place of Lightning's defaults; the strategy calls it in ``setup``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class SplitModelSummary(ModelSummary):
    """Lightning's model summary for a model split by ``ModelParallel``: the whole model, per stage and rank.

    Every rank reports the parameters it holds (a collective at the start of ``fit``); global rank 0 prints.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan = getattr(trainer.strategy, "plan", None)
        if not self._max_depth or plan is None:
            super().on_fit_start(trainer, pl_module)
            return
        held = _gather((trainer.global_rank, getattr(trainer.strategy, "stage", 0), *_held(pl_module)))
        if trainer.is_global_zero:
            log.info("\n" + format_split_summary(pl_module, plan, held, getattr(trainer.strategy, "layout", None)))


def format_split_summary(module: Any, plan: Any, held: list[tuple[int, int, int, int]], layout: Any) -> str:
    """The summary table: one row per stage (its layers, whole-model parameters, ranks with what they hold)."""
    counts = list(plan.param_counts or [])
    total = sum(counts)
    shape = f" (dp={layout.dp} × pp={layout.pp} × tp={layout.tp})" if layout is not None else ""
    lines = [
        f"lightning-mp model summary: {type(module).__name__}, {_human(total)} parameters in {plan.num_stages}"
        f" stages{shape}",
        f"  {'stage':>5}  {'parameters':>10}  {'layers':<44}  ranks: parameters held (trainable)",
    ]
    for row in plan.describe():
        s = row["stage"]
        ranks = ", ".join(
            f"{rank}: {_human(n)} ({_human(t)})" for rank, stage, n, t in sorted(held) if stage == s
        )  # fmt: skip
        params = _human(counts[s]) if s < len(counts) else "?"
        lines.append(f"  {s:>5}  {params:>10}  {_clip(row['layers'], 44):<44}  {ranks}")
    held_total = sum(n for _, _, n, _ in held)
    lines.append(f"  parameters held by all ranks together: {_human(held_total)} (copies included)")
    return "\n".join(lines)


def _held(module: Any) -> tuple[int, int]:
    """(parameters, trainable parameters) this rank holds as ``nn.Parameter`` (other stages' are stand-ins)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _gather(row: tuple[int, ...]) -> list[tuple[int, ...]]:
    if not (dist.is_available() and dist.is_initialized()):
        return [row]
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return [tuple(r) for r in rows]


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, saying "Epoch 0" (not "Epoch 0/-2") when only ``max_steps`` bounds the run,
    and leaving out the logger's version number."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "")
        return description

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def use_split_model_callbacks(trainer: L.Trainer) -> None:
    """Replace Lightning's default model summary and rich progress bar by the ones above (a user's own subclass of
    either stays)."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = SplitModelSummary(max_depth=callback._max_depth)
        elif type(callback) is RichProgressBar:
            trainer.callbacks[i] = bar = StepProgressBar()
            bar.setup(trainer, trainer.lightning_module, stage=trainer.state.fn)  # as Lightning set up the old one
        elif type(callback) is TQDMProgressBar:
            callback.get_metrics = _without_version(callback.get_metrics)  # type: ignore[method-assign]


def _without_version(get_metrics: Any) -> Any:
    def metrics(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    return metrics

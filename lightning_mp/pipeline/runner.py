"""One pipeline step of a LightningModule: micro-batches through the user's own step, on one stage of the pipeline.

``PipelineRunner`` runs training and evaluation steps on the stage that ``StageRuntime`` made of the local model
(the split itself comes from :mod:`lightning_mp.plan.build`): split the batch, run the schedule, combine the last
stage's loss and logs, and share them with every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_mp.observe.monitor import StageMonitor, stage_utilization
from lightning_mp.observe.stats import StepStats
from lightning_mp.observe.step_logs import LogRecords, capture_logs, log_step_values, replay_logs
from lightning_mp.observe.timeline import ideal_bubble
from lightning_mp.pipeline.executor import PipelineExecutor, StepResult
from lightning_mp.pipeline.losses import RecorderPlacement, StepLosses
from lightning_mp.pipeline.microbatch import batch_size_of, concat_microbatches, split_batch
from lightning_mp.pipeline.stage import StageRuntime
from lightning_mp.pipeline.weight_grads import DeferredWeightGrads
from lightning_mp.plan.schedules import DEFERRING, build_schedule, forward_only, tick_plan
from lightning_mp.runtime.messages import P2P, all_gather_bytes, broadcast_object, dump_object, load_object
from lightning_mp.runtime.tree import tree_leaves

log = logging.getLogger("lightning_mp")

ADVICE_AFTER_STEPS = 10  # measured steps before the monitor judges the balance
HISTORY_STEPS = 1000  # per-step statistics kept for summaries
TIMELINE_STEPS = 20  # steps whose every-stage spans are kept for the timeline


class PipelineRunner:
    """Runs training and evaluation steps of one stage.

    Args:
        module: the LightningModule, already split by ``runtime``.
        runtime: this rank's stage.
        pp_ranks: global ranks of this rank's pipeline group, by stage.
        pp_group: that group (for sharing the last stage's loss and logs).
        schedule: a name of schedules.SCHEDULE_CHOICES other than "auto".
        microbatches: micro-batches per step (fewer when the batch has fewer samples).
        monitor: log per-stage utilization and the bubble each step, and advise a better split when imbalanced.
        p2p: the messenger to the neighbouring stages (one without a failure watch by default).
        activation_checkpointing: "never", "except_last" or "always" (see ``ModelParallel``).
    """

    def __init__(
        self,
        module: Any,
        runtime: StageRuntime,
        pp_ranks: Sequence[int],
        pp_group: dist.ProcessGroup | None,
        schedule: str,
        microbatches: int,
        device: torch.device,
        monitor: bool = True,
        p2p: P2P | None = None,
        activation_checkpointing: str = "never",
        loss_normalization: str = "auto",
    ) -> None:
        self.module = module
        self.loss_normalization = loss_normalization
        self._warned_weighting = False
        self.runtime = runtime
        self.pp_ranks = list(pp_ranks)
        self.pp_group = pp_group
        self.schedule = schedule
        self.device = device
        self.microbatches = 1 if schedule == "none" else microbatches
        self.chunks = len(runtime.chunks)  # (virtual) stages per rank: > 1 with interleaved or V schedules
        placement = runtime.plan.stage_ranks or list(range(len(self.pp_ranks)))
        self.final_rank = placement[-1]  # the pipeline rank running the last stage (the loss)
        self.executor = PipelineExecutor(
            runtime,
            p2p or P2P(device),
            rank_of_stage=lambda k: self.pp_ranks[placement[k]],
            global_rank=lambda r: self.pp_ranks[r],
            activation_checkpointing=activation_checkpointing,
            deferred=self._deferred_weight_grads(runtime) if schedule in DEFERRING else None,
        )
        # the most recent steps only: a long run must not grow memory with its step count
        self.history: deque[StepStats] = deque(maxlen=HISTORY_STEPS)
        self.timelines: deque[list[StepStats]] = deque(maxlen=TIMELINE_STEPS)  # every stage's, with spans
        self.monitor = StageMonitor(self._layers_per_rank(), advise=self.chunks == 1) if monitor else None
        self._advised = False
        # around every step's forwards and backwards (tensor parallelism's vocabulary-parallel loss)
        self.step_context: Callable[[], AbstractContextManager[Any]] = nullcontext
        # fp16: the precision plugin's GradScaler.scale, applied to every micro-batch's backward loss (loss_scaling.py)
        self.scale_loss: Callable[[Tensor], Tensor] | None = None
        self._recorder_placement = RecorderPlacement()  # the loss recorder on from the last layer (losses.py)

    def _arm_after_layers(self, call: Callable[[], None] | None) -> None:
        self.runtime.after_layers = call

    def _layers_per_rank(self) -> list[int]:
        plan = self.runtime.plan
        placement = plan.stage_ranks or list(range(len(self.pp_ranks)))
        return [sum(n for n, rank in zip(plan.balance, placement) if rank == r) for r in range(len(self.pp_ranks))]

    @staticmethod
    def _deferred_weight_grads(runtime: StageRuntime) -> DeferredWeightGrads:
        deferred = DeferredWeightGrads()
        deferred.install([runtime.plan.layers.layer(i) for i in runtime.own_layers])
        return deferred

    def train_step(
        self, hook: str, batch: Any, rest: tuple, loss_scale: float
    ) -> tuple[Tensor | None, tuple[float, float] | None]:
        """Forward and backward of every micro-batch of ``batch``; returns (the batch's loss, on every stage; and,
        when the micro-batches were weighed by their token counts, ``(ref, count)``: the step's gradients are then
        to be scaled by ``ref / count``; see :class:`~lightning_mp.pipeline.losses.StepLosses`).

        The gradients land in ``.grad`` (the caller sets them aside for Lightning's ``backward``), already multiplied
        by ``loss_scale`` (1 / accumulated batches).
        """
        result, records, losses, total = self._run(hook, batch, rest, loss_scale)
        loss = losses.batch_loss(result.outputs) if self.runtime.is_last else None
        norm = losses.normalizer() if self.runtime.is_last else None
        if self.runtime.is_last and losses.unrecognised_reason is not None and not self._warned_weighting:
            self._warned_weighting = True
            rank_zero_warn(
                f"lightning-mp weighs micro-batches by their sample counts: {losses.unrecognised_reason}. This matches"
                " one process when every sample counts equally in the loss; a token-mean loss over padded batches"
                " is matched exactly when the step returns the output of F.cross_entropy (or nn.CrossEntropyLoss, a"
                " Hugging Face model's loss, F.nll_loss, an mse/l1-style loss, Tensor.mean) itself."
            )
        if self.monitor is not None:
            result.stats.utilization = stage_utilization(self.device)
        loss, norm = self._share(records, (loss, norm), total, result.stats)
        self.history.append(dataclasses.replace(result.stats, spans=[]))
        return loss, norm

    def eval_step(self, hook: str, batch: Any, rest: tuple) -> Any:
        """Forward-only pipeline of ``batch`` through ``hook`` ("validation_step" or "test_step").

        Returns the last micro-batch's output on the last stage and None elsewhere.
        """
        result, records, _, total = self._run(hook, batch, rest)
        self._share(records, (None, None), total)
        return result.outputs[-1] if self.runtime.is_last else None

    def predict_step(self, batch: Any, rest: tuple, everywhere: bool = True) -> Any:
        """Forward-only pipeline through ``predict_step``; the whole batch's predictions on every stage, or (not
        ``everywhere``) on the first stage only (None elsewhere)."""
        result, _, _, _ = self._run("predict_step", batch, rest)
        predictions = concat_microbatches(result.outputs) if self.runtime.is_last else None
        if everywhere:
            return self._from_last_stage(predictions)
        if len(self.pp_ranks) == 1 or self.final_rank == 0:  # (the V shape ends on the first rank)
            return predictions
        p2p = self.executor.p2p
        if self.runtime.is_last:
            p2p.send_activation(predictions, self.pp_ranks[0], "the predictions")
            p2p.wait_sends()
        elif self.runtime.stage == 0:
            with torch.no_grad():
                return p2p.recv_activation(self.pp_ranks[self.final_rank], "the predictions").value
        return None

    def _run(
        self, hook: str, batch: Any, rest: tuple, loss_scale: float | None = None
    ) -> tuple[StepResult, LogRecords, StepLosses, int]:
        """Split ``batch`` and run the schedule (forward-only without ``loss_scale``)."""
        microbatches, sizes = split_batch(batch, self.microbatches)
        if len(microbatches) == 1 and self.microbatches > 1 and batch_size_of(batch) is None:
            rank_zero_warn(
                f"lightning-mp found no batch dimension in a batch of type {type(batch).__name__} (no tensor in a"
                " tuple, list, dict or dataclass): it runs as one micro-batch, without pipelining."
            )
        losses = StepLosses(sizes, 1.0 if loss_scale is None else loss_scale, self.loss_normalization)
        records = LogRecords()
        stage, stages, m = self.runtime.stage, len(self.pp_ranks), len(microbatches)
        ticks = None
        if self.chunks > 1:  # several stages per rank: messages go tick by tick (runtime/exchange.py)
            ticks = tick_plan(self.schedule, stage, stages, m, self.chunks, training=loss_scale is not None)
            actions = list(ticks.actions)
        elif loss_scale is None:
            actions = forward_only(stage, stages, m, self.chunks, self.schedule)
        else:
            actions = build_schedule(self.schedule, stage, stages, m, self.chunks)
        run = self._step_fn(hook, microbatches, rest, records, losses)
        backward_loss = None
        if loss_scale is not None:
            backward_loss = losses.backward_loss
            scale = self.scale_loss
            if scale is not None:  # the gradients every stage receives are scaled alike
                backward_loss = lambda i, loss: scale(losses.backward_loss(i, loss))  # noqa: E731
                scale(torch.zeros((), device=self.device))  # every rank's scaler holds its scale (unscale_ needs it)
        with self.step_context():
            result = self.executor.run(actions, run, backward_loss, signatures(microbatches, hook), ticks)
        return result, records, losses, sum(sizes)

    def _step_fn(self, hook: str, microbatches: list, rest: tuple, records: LogRecords, losses: StepLosses):
        step = getattr(self.module, hook)
        observe = self.runtime.is_last and hook != "predict_step"  # the rank that computes the loss
        placement = self._recorder_placement

        def run(index: int) -> Any:
            with capture_logs(self.module, records, lambda value: losses.log_weight(index, value)):
                if not observe:
                    return step(microbatches[index], *rest)
                with placement.recording(losses.recorder(index), self._arm_after_layers, hook):
                    return step(microbatches[index], *rest)

        return run

    def _share(self, records: LogRecords, loss: Any, batch_size: int, stats: StepStats | None = None) -> Any:
        """Send the last stage's ``loss`` (any picklable value) and logged values to every stage, and log them there.

        In training (``stats`` given) every stage's step statistics travel in the same collective and feed the
        monitor: per-stage utilization and bubble metrics, and balance advice.
        """
        payload = (loss, records.combined(self.module)) if self.runtime.is_last else None
        if stats is None or self.monitor is None:
            shared_loss, combined = self._from_last_stage(payload)
        else:
            stages = [stats]
            if len(self.pp_ranks) > 1:
                shared, stages = self._gather_stats(payload, stats)
                payload = payload if self.runtime.is_last else shared
            shared_loss, combined = payload
            self.timelines.append(stages)
            metrics = self.monitor.update(stages)
            metrics["pipeline/bubble_ideal"] = ideal_bubble(self.schedule, len(stages), self.microbatches, self.chunks)
            for stage, s in enumerate(stages):
                metrics[f"pipeline/stage{stage}_peak_activation_mb"] = s.peak_activation_bytes / 2**20
                if s.utilization is not None:  # a GPU whose NVML reads
                    metrics[f"pipeline/stage{stage}_gpu_util"] = s.utilization
            log_step_values(self.module, metrics, batch_size)
            self._advise()
        replay_logs(self.module, combined, batch_size)
        return shared_loss

    def _gather_stats(self, payload: Any, stats: StepStats) -> tuple[Any, list[StepStats]]:
        """(the last stage's ``payload``, every stage's ``stats``) on every stage, in one collective for a step of
        usual size. The stats (numbers) travel pickled; the payload (loss and logged values: tensors, metric states)
        is saved by its one sender and loaded only by the others: ~0.5 ms less per step than saving and loading
        everything as objects."""
        saved = dump_object(payload) if self.runtime.is_last else None
        mine = pickle.dumps((saved, stats))
        everyone = [pickle.loads(data) for data in all_gather_bytes(mine, self.pp_group, self.device)]
        shared = None if self.runtime.is_last else load_object(everyone[self.final_rank][0], self.device)
        return shared, [s for _, s in everyone]

    def reset_monitor(self) -> None:
        """Start measuring afresh (after the split changed)."""
        if self.monitor is not None:
            self.monitor = StageMonitor(self._layers_per_rank(), advise=self.chunks == 1)

    def _advise(self) -> None:
        """Once, after enough steps: say so when the stages are imbalanced, with the split that fixes it."""
        monitor = self.monitor
        if monitor is None or self._advised or monitor.steps < monitor.warmup + ADVICE_AFTER_STEPS:
            return
        self._advised = True
        better = monitor.suggestion()
        if better is not None and dist.get_rank() == 0:
            log.warning(
                f"lightning-mp: the pipeline stages are imbalanced: the busiest stage computes {monitor.imbalance:.2f}"
                f"× the mean (per-stage busy seconds over {monitor.steps - monitor.warmup} steps:"
                f" {[round(b, 3) for b in monitor.busy_sum]}). A better split is balance={better}: pass"
                f" ModelParallel(balance={better}), or strategy.balance=[{','.join(map(str, better))}] on a Hydra"
                " command line."
            )

    def _from_last_stage(self, obj: Any) -> Any:
        """The last stage's ``obj`` on every stage of the pipeline."""
        if len(self.pp_ranks) == 1:
            return obj
        return broadcast_object(obj, self.pp_ranks[self.final_rank], self.pp_group, self.device)


def signatures(microbatches: Sequence[Any], hook: str) -> list[Any]:
    """What each micro-batch's stage messages are shaped by, alike on every stage of the pipeline (they all hold the
    same micro-batches): the hook, the grad mode and the micro-batch's tensor shapes and dtypes and plain constants.
    Messages between stages send their structure once per signature (runtime/messages.py)."""
    grad = torch.is_grad_enabled()
    return [
        (hook, grad, tuple(_leaf_signature(leaf) for leaf in tree_leaves(microbatch, _is_signature_leaf)))
        for microbatch in microbatches
    ]


def _is_signature_leaf(obj: Any) -> bool:
    return isinstance(obj, (Tensor, int, float, str, bytes))  # (a string may be tokenized into any length)


def _leaf_signature(leaf: Any) -> Any:
    return (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, Tensor) else leaf

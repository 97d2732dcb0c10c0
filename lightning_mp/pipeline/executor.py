"""Runs one step of a pipeline schedule on one stage: forwards, backwards and the messages between stages."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_mp.observe.stats import StepStats
from lightning_mp.pipeline.losses import step_loss
from lightning_mp.pipeline.stage import StageDone, StageRuntime
from lightning_mp.pipeline.weight_grads import DeferredWeightGrads
from lightning_mp.plan.profiling import storage_id
from lightning_mp.plan.schedules import Action
from lightning_mp.runtime.messages import P2P, Received


@dataclass
class StepResult:
    """What the last stage computed: each micro-batch's step output (None on other stages)."""

    outputs: list[Any] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)


@dataclass
class _InFlight:
    received: Received | None = None
    sent: list[Tensor] = field(default_factory=list)
    loss: Tensor | None = None


class PipelineExecutor:
    """Executes schedule actions on one stage. ``run_microbatch(i)`` runs the user's step on micro-batch ``i``.

    ``rank_of_stage(k)`` is the global rank that runs (virtual) stage ``k``. With several stages per rank
    (``runtime.chunks``) every message is keyed by its stage and micro-batch (see comm.py).
    """

    def __init__(
        self,
        runtime: StageRuntime,
        p2p: P2P,
        rank_of_stage: Callable[[int], int],
        activation_checkpointing: str = "never",
        deferred: DeferredWeightGrads | None = None,
    ) -> None:
        self.runtime = runtime
        self.deferred = deferred  # zero_bubble: weight gradients run while waiting (weight_grads.py)
        self.p2p = p2p
        self.rank_of_stage = rank_of_stage
        self.keyed = len(runtime.chunks) > 1
        self.activation_checkpointing = activation_checkpointing
        self.time_origin = time.perf_counter()  # spans are relative to it (set alike on every rank after a barrier)
        self._memory = _ActivationMemory()

    def run(
        self,
        actions: Sequence[Action],
        run_microbatch: Callable[[int], Any],
        backward_loss: Callable[[int, Tensor], Tensor] | None = None,
    ) -> StepResult:
        """Run ``actions``; with ``backward_loss`` (training) the last stage back-propagates
        ``backward_loss(i, loss_i)`` for micro-batch ``i``."""
        result = StepResult(outputs=[None] * (max(a.microbatch for a in actions) + 1))
        stats = result.stats
        start = time.perf_counter()
        in_flight: dict[tuple[int, int], _InFlight] = {}
        last = len(result.outputs) - 1
        training = backward_loss is not None
        self._memory.start(self.runtime.parameter_storages() if training else None)
        deferred = self.deferred if training else None
        if deferred is not None:
            deferred.enabled = True
        try:
            for action in actions:
                key = (action.microbatch, action.stage)
                if deferred is not None:
                    deferred.microbatch = action.microbatch
                if action.kind == "F":
                    self.runtime.checkpointing = training and (
                        self.activation_checkpointing == "always"
                        or (self.activation_checkpointing == "except_last" and action.microbatch != last)
                    )
                    with self._memory.saving(key):
                        in_flight[key] = self._forward(action, run_microbatch, result)
                    if backward_loss is None:
                        in_flight.pop(key)
                    elif self.runtime.is_final(action.stage):
                        loss = step_loss(result.outputs[action.microbatch])
                        if loss is not None:
                            in_flight[key].loss = backward_loss(action.microbatch, loss)
                else:
                    self._backward(action, in_flight.pop(key), stats)
                    self._memory.free(key)
                    if deferred is not None:  # hold at most as many micro-batches' inputs as 1F1B holds
                        self._run_deferred(stats, keep=self.runtime.plan.num_stages - self.runtime.stage)
            if deferred is not None:
                self._run_deferred(stats, keep=0)
            t0 = time.perf_counter()
            self.p2p.wait_sends()
            self._span(stats, "send", -1, t0)
            self.runtime.check_no_bypass()
        finally:
            if deferred is not None:
                deferred.clear()
            self.runtime.checkpointing = False
            stats.wall = time.perf_counter() - start
            stats.layer_forward = self.runtime.take_layer_forward_times()
            stats.peak_activation_bytes = self._memory.stop()
        return result

    def _run_deferred(self, stats: StepStats, keep: int = 0, one: bool = False) -> None:
        """Run queued weight-gradient products (one; or until ``keep`` micro-batches wait), as busy "W" spans."""
        deferred = self.deferred
        assert deferred is not None
        while deferred.has_pending() and (one or len(deferred.pending) > keep):
            t0 = time.perf_counter()
            microbatch = deferred.run_one()
            stats.busy += self._span(stats, "W", microbatch, t0)
            if one:
                return

    def _fill_one(self, stats: StepStats) -> bool:
        """Run one queued weight-gradient product; False when none is queued."""
        assert self.deferred is not None
        if not self.deferred.has_pending():
            return False
        self._run_deferred(stats, one=True)
        return True

    def _span(self, stats: StepStats, kind: str, microbatch: int, start: float) -> float:
        """Record a span from ``start`` to now; return its length."""
        end = time.perf_counter()
        stats.spans.append((kind, microbatch, start - self.time_origin, end - self.time_origin))
        return end - start

    def _key(self, kind: str, stage: int, index: int) -> tuple[str, int, int] | None:
        """The key of a message to (virtual) stage ``stage`` about micro-batch ``index`` (None: unkeyed)."""
        return (kind, stage, index) if self.keyed else None

    def _forward(self, action: Action, run_microbatch: Callable[[int], Any], result: StepResult) -> _InFlight:
        stats = result.stats
        item = _InFlight()
        index, stage = action.microbatch, action.stage
        if stage > 0:
            t0 = time.perf_counter()
            label = f"the activation of micro-batch {index}"
            key = self._key("F", stage, index)
            item.received = self.p2p.recv_activation(self.rank_of_stage(stage - 1), label, key)
            stats.wait += self._span(stats, "recv", index, t0)
        t0 = time.perf_counter()
        self.runtime.begin_forward(item.received, stage)
        output = None
        try:
            output = run_microbatch(index)
        except StageDone:
            pass
        except BaseException:
            self.runtime.abort_forward()
            raise
        captured = self.runtime.end_forward()
        stats.busy += self._span(stats, "F", index, t0)
        if self.runtime.is_final(stage):
            result.outputs[index] = output
        else:
            label = f"the activation of micro-batch {index}"
            key = self._key("F", stage + 1, index)
            item.sent = self.p2p.send_activation(captured, self.rank_of_stage(stage + 1), label, key)
        return item

    def _backward(self, action: Action, item: _InFlight, stats: StepStats) -> None:
        index, stage = action.microbatch, action.stage
        label = f"the gradient of micro-batch {index}"
        if self.runtime.is_final(stage):
            t0 = time.perf_counter()
            if item.loss is not None and item.loss.requires_grad:
                item.loss.backward()
        else:
            source = self.rank_of_stage(stage + 1)
            filling = self.deferred is not None and self.deferred.enabled
            if filling and self.keyed:  # zero_bubble_v: weight gradients fill the wait for the next message
                t0 = time.perf_counter()
                outputs, grads = self.p2p.recv_grads(
                    item.sent, source, label, self._key("B", stage, index), lambda: self._fill_one(stats)
                )
            elif filling:
                assert self.deferred is not None
                pending = self.p2p.irecv_grads(item.sent, source, label)
                while self.deferred.has_pending() and not pending.ready():  # fill the wait with weight gradients
                    self._run_deferred(stats, one=True)
                t0 = time.perf_counter()
                outputs, grads = pending.wait()
            else:
                t0 = time.perf_counter()
                outputs, grads = self.p2p.recv_grads(item.sent, source, label, self._key("B", stage, index))
            stats.wait += self._span(stats, "recv", index, t0)
            t0 = time.perf_counter()
            if outputs:
                torch.autograd.backward(outputs, grads)
        stats.busy += self._span(stats, "B", index, t0)
        if item.received is not None:
            key = self._key("B", stage - 1, index)
            self.p2p.send_grads(item.received, self.rank_of_stage(stage - 1), label, key)


class _ActivationMemory:
    """Bytes of the tensors each in-flight micro-batch saved for its backward (parameters excluded), and the peak of
    their sum over a step: what a schedule's in-flight micro-batches cost in memory, on any device."""

    def __init__(self) -> None:
        self.params: set[int] | None = None
        self.held: dict[Any, int] = {}  # bytes by in-flight (micro-batch, stage)
        self.peak = 0

    def start(self, param_storages: set[int] | None) -> None:
        self.params, self.held, self.peak = param_storages, {}, 0

    @contextlib.contextmanager
    def saving(self, microbatch: Any) -> Iterator[None]:
        if self.params is None:  # forward only: nothing is saved for a backward
            yield
            return
        params = self.params

        def pack(t: Tensor) -> Tensor:
            if storage_id(t) not in params:
                self.held[microbatch] = self.held.get(microbatch, 0) + t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak = max(self.peak, sum(self.held.values()))

    def free(self, microbatch: Any) -> None:
        self.held.pop(microbatch, None)

    def stop(self) -> int:
        self.params = None
        return self.peak

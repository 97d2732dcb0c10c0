"""Runs one step of a pipeline schedule on one stage: forwards, backwards and the messages between stages."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_mp.comm import P2P, Received
from lightning_mp.errors import PipelineError
from lightning_mp.profiling import storage_id
from lightning_mp.schedules import Action
from lightning_mp.stage import StageDone, StageRuntime
from lightning_mp.weight_grads import DeferredWeightGrads


@dataclass
class StepStats:
    """Where one stage's time went during one step (seconds), and the most activation memory it held."""

    busy: float = 0.0  # forward and backward compute
    wait: float = 0.0  # blocked on receives
    wall: float = 0.0
    layer_forward: list[float] = field(default_factory=list)  # forward seconds of each own layer
    peak_activation_bytes: int = 0  # tensors saved for backward by the micro-batches in flight, at their peak
    # (kind, micro-batch, start, end) in seconds since the runner's time origin; kind: F, B, W, recv, send
    spans: list[tuple[str, int, float, float]] = field(default_factory=list)


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
    """Executes schedule actions on one stage. ``run_microbatch(i)`` runs the user's step on micro-batch ``i``."""

    def __init__(
        self,
        runtime: StageRuntime,
        p2p: P2P,
        prev_rank: int | None,
        next_rank: int | None,
        activation_checkpointing: str = "never",
        deferred: DeferredWeightGrads | None = None,
    ) -> None:
        self.runtime = runtime
        self.deferred = deferred  # zero_bubble: weight gradients run while waiting (weight_grads.py)
        self.p2p = p2p
        self.prev_rank = prev_rank
        self.next_rank = next_rank
        self.activation_checkpointing = activation_checkpointing
        self.time_origin = time.perf_counter()  # spans are relative to it (set alike on every rank after a barrier)
        self._memory = _ActivationMemory()

    def run(
        self,
        actions: Sequence[Action],
        run_microbatch: Callable[[int], Any],
        loss_weights: Sequence[float] | None = None,
    ) -> StepResult:
        """Run ``actions``; with ``loss_weights`` (training) the last stage back-propagates ``weight_i * loss_i``."""
        result = StepResult(outputs=[None] * (max(a.microbatch for a in actions) + 1))
        stats = result.stats
        start = time.perf_counter()
        in_flight: dict[int, _InFlight] = {}
        last = len(result.outputs) - 1
        self._memory.start(self.runtime.parameter_storages() if loss_weights is not None else None)
        deferred = self.deferred if loss_weights is not None else None
        if deferred is not None:
            deferred.enabled = True
        try:
            for action in actions:
                if deferred is not None:
                    deferred.microbatch = action.microbatch
                if action.kind == "F":
                    self.runtime.checkpointing = loss_weights is not None and (
                        self.activation_checkpointing == "always"
                        or (self.activation_checkpointing == "except_last" and action.microbatch != last)
                    )
                    with self._memory.saving(action.microbatch):
                        in_flight[action.microbatch] = self._forward(action.microbatch, run_microbatch, result)
                    if loss_weights is None:
                        in_flight.pop(action.microbatch)
                    elif self.runtime.is_last:
                        output = result.outputs[action.microbatch]
                        loss = _loss_of(output)
                        if loss is not None:
                            in_flight[action.microbatch].loss = loss * loss_weights[action.microbatch]
                else:
                    self._backward(action.microbatch, in_flight.pop(action.microbatch), stats)
                    self._memory.free(action.microbatch)
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

    def _span(self, stats: StepStats, kind: str, microbatch: int, start: float) -> float:
        """Record a span from ``start`` to now; return its length."""
        end = time.perf_counter()
        stats.spans.append((kind, microbatch, start - self.time_origin, end - self.time_origin))
        return end - start

    def _forward(self, index: int, run_microbatch: Callable[[int], Any], result: StepResult) -> _InFlight:
        stats = result.stats
        item = _InFlight()
        if self.prev_rank is not None:
            t0 = time.perf_counter()
            item.received = self.p2p.recv_activation(self.prev_rank, f"the activation of micro-batch {index}")
            stats.wait += self._span(stats, "recv", index, t0)
        t0 = time.perf_counter()
        self.runtime.begin_forward(item.received)
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
        if self.runtime.is_last:
            result.outputs[index] = output
        else:
            label = f"the activation of micro-batch {index}"
            item.sent = self.p2p.send_activation(captured, self.next_rank, label)  # type: ignore[arg-type]
        return item

    def _backward(self, index: int, item: _InFlight, stats: StepStats) -> None:
        label = f"the gradient of micro-batch {index}"
        if self.runtime.is_last:
            t0 = time.perf_counter()
            if item.loss is not None and item.loss.requires_grad:
                item.loss.backward()
        else:
            if self.deferred is not None and self.deferred.enabled:
                pending = self.p2p.irecv_grads(item.sent, self.next_rank, label)  # type: ignore[arg-type]
                while self.deferred.has_pending() and not pending.ready():  # fill the wait with weight gradients
                    self._run_deferred(stats, one=True)
                t0 = time.perf_counter()
                outputs, grads = pending.wait()
            else:
                t0 = time.perf_counter()
                outputs, grads = self.p2p.recv_grads(item.sent, self.next_rank, label)  # type: ignore[arg-type]
            stats.wait += self._span(stats, "recv", index, t0)
            t0 = time.perf_counter()
            if outputs:
                torch.autograd.backward(outputs, grads)
        stats.busy += self._span(stats, "B", index, t0)
        if item.received is not None:
            self.p2p.send_grads(item.received, self.prev_rank, label)  # type: ignore[arg-type]


class _ActivationMemory:
    """Bytes of the tensors each in-flight micro-batch saved for its backward (parameters excluded), and the peak of
    their sum over a step: what a schedule's in-flight micro-batches cost in memory, on any device."""

    def __init__(self) -> None:
        self.params: set[int] | None = None
        self.held: dict[int, int] = {}
        self.peak = 0

    def start(self, param_storages: set[int] | None) -> None:
        self.params, self.held, self.peak = param_storages, {}, 0

    @contextlib.contextmanager
    def saving(self, microbatch: int) -> Iterator[None]:
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

    def free(self, microbatch: int) -> None:
        self.held.pop(microbatch, None)

    def stop(self) -> int:
        self.params = None
        return self.peak


def _loss_of(output: Any) -> Tensor | None:
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    raise PipelineError(
        f"training_step returned a {type(output).__name__}; under automatic optimization it must return the loss"
        " tensor, a dict with a 'loss' key, or None."
    )

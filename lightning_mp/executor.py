"""Runs one step of a pipeline schedule on one stage: forwards, backwards and the messages between stages."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_mp.comm import P2P, Received
from lightning_mp.errors import PipelineError
from lightning_mp.schedules import Action
from lightning_mp.stage import StageDone, StageRuntime


@dataclass
class StepStats:
    """Where one stage's time went during one step (seconds)."""

    busy: float = 0.0  # forward and backward compute
    wait: float = 0.0  # blocked on receives
    wall: float = 0.0
    layer_forward: list[float] = field(default_factory=list)  # forward seconds of each own layer


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

    def __init__(self, runtime: StageRuntime, p2p: P2P, prev_rank: int | None, next_rank: int | None) -> None:
        self.runtime = runtime
        self.p2p = p2p
        self.prev_rank = prev_rank
        self.next_rank = next_rank

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
        try:
            for action in actions:
                if action.kind == "F":
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
            self.p2p.wait_sends()
            self.runtime.check_no_bypass()
        finally:
            stats.wall = time.perf_counter() - start
            stats.layer_forward = self.runtime.take_layer_forward_times()
        return result

    def _forward(self, index: int, run_microbatch: Callable[[int], Any], result: StepResult) -> _InFlight:
        stats = result.stats
        item = _InFlight()
        if self.prev_rank is not None:
            t0 = time.perf_counter()
            item.received = self.p2p.recv_activation(self.prev_rank, f"the activation of micro-batch {index}")
            stats.wait += time.perf_counter() - t0
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
        stats.busy += time.perf_counter() - t0
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
            t0 = time.perf_counter()
            outputs, grads = self.p2p.recv_grads(item.sent, self.next_rank, label)  # type: ignore[arg-type]
            stats.wait += time.perf_counter() - t0
            t0 = time.perf_counter()
            if outputs:
                torch.autograd.backward(outputs, grads)
        stats.busy += time.perf_counter() - t0
        if item.received is not None:
            self.p2p.send_grads(item.received, self.prev_rank, label)  # type: ignore[arg-type]


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

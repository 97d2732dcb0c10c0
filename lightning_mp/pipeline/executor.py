"""Runs one step of a pipeline schedule on one stage: forwards, backwards and the messages between stages.

Each action first receives what it needs, posting the previous action's queued sends in the same batch (or, when it
receives nothing, posting them alone) before it computes: the order :func:`lightning_mp.plan.schedules.simulate`
proves free of deadlock when sends block (NCCL). Time is device time (:mod:`lightning_mp.runtime.clock`): spans are
marks, turned into seconds once at the end of the step.
"""

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
from lightning_mp.plan.schedules import Action, TickPlan
from lightning_mp.runtime.clock import clock_for
from lightning_mp.runtime.exchange import TickExchange
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

    ``rank_of_stage(k)`` is the global rank that runs (virtual) stage ``k``, ``global_rank(r)`` that of pipeline rank
    ``r``. With several stages per rank (``runtime.chunks``) messages go tick by tick (runtime/exchange.py).
    """

    def __init__(
        self,
        runtime: StageRuntime,
        p2p: P2P,
        rank_of_stage: Callable[[int], int],
        global_rank: Callable[[int], int] | None = None,
        activation_checkpointing: str = "never",
        deferred: DeferredWeightGrads | None = None,
    ) -> None:
        self.runtime = runtime
        self.deferred = deferred  # zero_bubble: weight gradients run while waiting (weight_grads.py)
        self.p2p = p2p
        self.rank_of_stage = rank_of_stage
        self.exchange = TickExchange(p2p, global_rank or (lambda r: r)) if len(runtime.chunks) > 1 else None
        self.activation_checkpointing = activation_checkpointing
        self.clock = clock_for(p2p.device)  # device time: CUDA events on a GPU, perf_counter on a CPU
        self.time_origin = time.perf_counter()  # spans are relative to it (set alike on every rank after a barrier)
        self._memory = _ActivationMemory()
        self._marks: list[tuple[str, int, Any, Any]] = []  # this step's spans, as clock marks
        self._spec_keys: Sequence[Any] | None = None
        self._tick = 0  # with several stages per rank: the tick of the running action

    def run(
        self,
        actions: Sequence[Action],
        run_microbatch: Callable[[int], Any],
        backward_loss: Callable[[int, Tensor], Tensor] | None = None,
        signatures: Sequence[Any] | None = None,
        ticks: TickPlan | None = None,
    ) -> StepResult:
        """Run ``actions``; with ``backward_loss`` (training) the last stage back-propagates
        ``backward_loss(i, loss_i)`` for micro-batch ``i``. ``signatures[i]`` says what shapes micro-batch ``i``'s
        messages: alike on every stage, it lets them skip the header of a structure sent before (messages.py).
        With several stages per rank, ``ticks`` is the rank's plan (its actions, their ticks and its exchanges)."""
        result = StepResult(outputs=[None] * (max(a.microbatch for a in actions) + 1))
        stats = result.stats
        self._spec_keys = signatures
        exchange = self.exchange
        if exchange is not None:
            assert ticks is not None and list(ticks.actions) == list(actions), "a tick plan of these actions"
            exchange.start(ticks.exchanges, self._spec_key if signatures is not None else None)
        self._marks = []
        self.clock.start_step()
        start = self.clock.mark()
        in_flight: dict[tuple[int, int], _InFlight] = {}
        last = len(result.outputs) - 1
        training = backward_loss is not None
        measuring = training and self._memory.due()
        self._memory.start(self.runtime.parameter_storages() if measuring else None)
        deferred = self.deferred if training else None
        if deferred is not None:
            deferred.enabled = True
        try:
            for j, action in enumerate(actions):
                key = (action.microbatch, action.stage)
                if exchange is not None:
                    assert ticks is not None
                    exchange.advance(ticks.ticks[j])
                    self._tick = ticks.ticks[j]
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
            t0 = self.clock.mark()
            if exchange is not None:
                exchange.finish()
            self.p2p.wait_sends()
            self._span(stats, "send", -1, t0)
            self.runtime.check_no_bypass()
        finally:
            if deferred is not None:
                deferred.clear()
            self.runtime.checkpointing = False
            self._settle(stats, start)
            stats.layer_forward = self.runtime.take_layer_forward_times()
            stats.peak_activation_bytes = self._memory.stop()
        return result

    def _run_deferred(self, stats: StepStats, keep: int = 0, one: bool = False) -> None:
        """Run queued weight-gradient products (one; or until ``keep`` micro-batches wait), as busy "W" spans."""
        deferred = self.deferred
        assert deferred is not None
        if deferred.has_pending() and (one or len(deferred.pending) > keep):
            self._post_sent()
        while deferred.has_pending() and (one or len(deferred.pending) > keep):
            t0 = self.clock.mark()
            microbatch = deferred.run_one()
            self._span(stats, "W", microbatch, t0)
            if one:
                return

    def _post_sent(self) -> None:
        """Post what the last action sent (otherwise posted with the next action's receive), so that the weight
        gradients about to run do not hold back the message a neighbour waits for (the same posting order, earlier)."""
        if self.exchange is not None:
            self.exchange.advance_computed(self._tick)
        else:
            self.p2p.flush()

    def _fill_one(self, stats: StepStats) -> bool:
        """Run one queued weight-gradient product; False when none is queued."""
        assert self.deferred is not None
        if not self.deferred.has_pending():
            return False
        self._run_deferred(stats, one=True)
        return True

    def _span(self, stats: StepStats, kind: str, microbatch: int, start: Any) -> None:
        """Record a span from the mark ``start`` to now (read in :meth:`_settle`)."""
        self._marks.append((kind, microbatch, start, self.clock.mark()))

    def _settle(self, stats: StepStats, start: Any) -> None:
        """Turn the step's marks into spans and busy (F, B, W) and waiting (recv) seconds: one read of the clock."""
        end = self.clock.mark()
        marks = [m for _, _, a, b in self._marks for m in (a, b)]
        seconds = self.clock.seconds([start, *marks, end])
        origin = self.time_origin
        for j, (kind, microbatch, _, _) in enumerate(self._marks):
            t0, t1 = seconds[1 + 2 * j], seconds[2 + 2 * j]
            stats.spans.append((kind, microbatch, t0 - origin, t1 - origin))
            if kind == "recv":
                stats.wait += t1 - t0
            elif kind != "send":
                stats.busy += t1 - t0
        stats.wall = seconds[-1] - seconds[0]
        self._marks = []

    def _spec_key(self, stage: int, index: int) -> Any:
        """What the structure of (unkeyed) stage ``stage``'s message about micro-batch ``index`` is known by."""
        return None if self._spec_keys is None else (stage, self._spec_keys[index])

    def _forward(self, action: Action, run_microbatch: Callable[[int], Any], result: StepResult) -> _InFlight:
        stats = result.stats
        item = _InFlight()
        index, stage = action.microbatch, action.stage
        if stage > 0:
            t0 = self.clock.mark()
            if self.exchange is not None:
                item.received = self.exchange.take(("F", stage, index))
            else:
                label = f"the activation of micro-batch {index}"
                source = self.rank_of_stage(stage - 1)
                item.received = self.p2p.recv_activation(source, label, self._spec_key(stage - 1, index))
            self._span(stats, "recv", index, t0)
        self.p2p.flush()  # the previous action's sends, when no receive took them along
        t0 = self.clock.mark()
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
        self._span(stats, "F", index, t0)
        if self.runtime.is_final(stage):
            result.outputs[index] = output
        elif self.exchange is not None:
            item.sent = self.exchange.put(("F", stage + 1, index), captured)
        else:
            label = f"the activation of micro-batch {index}"
            spec_key = self._spec_key(stage, index)
            item.sent = self.p2p.send_activation(captured, self.rank_of_stage(stage + 1), label, spec_key)
        return item

    def _backward(self, action: Action, item: _InFlight, stats: StepStats) -> None:
        index, stage = action.microbatch, action.stage
        label = f"the gradient of micro-batch {index}"
        if self.runtime.is_final(stage):
            self.p2p.flush()
            t0 = self.clock.mark()
            if item.loss is not None and item.loss.requires_grad:
                item.loss.backward()
        else:
            source = self.rank_of_stage(stage + 1)
            filling = self.deferred is not None and self.deferred.enabled
            if self.exchange is not None:  # zero_bubble_v: weight gradients fill the wait for the gradients
                waiting = [self.clock.mark()]

                def fill() -> bool:  # the wait is counted apart from the weight gradients run in it
                    if not self.deferred.has_pending():  # type: ignore[union-attr]
                        return False
                    self._span(stats, "recv", index, waiting[0])
                    self._fill_one(stats)
                    waiting[0] = self.clock.mark()
                    return True

                outputs = [t for t in item.sent if t.requires_grad]
                grads = self.exchange.take_grads(("B", stage, index), fill if filling else None)
                t0 = waiting[0]
            elif filling:
                assert self.deferred is not None
                pending = self.p2p.irecv_grads(item.sent, source, label)
                while self.deferred.has_pending() and not pending.ready():  # fill the wait with weight gradients
                    self._run_deferred(stats, one=True)
                t0 = self.clock.mark()
                outputs, grads = pending.wait()
            else:
                t0 = self.clock.mark()
                outputs, grads = self.p2p.recv_grads(item.sent, source, label)
            self._span(stats, "recv", index, t0)
            self.p2p.flush()
            t0 = self.clock.mark()
            if outputs:
                torch.autograd.backward(outputs, grads)
        self._span(stats, "B", index, t0)
        if item.received is None:
            pass
        elif self.exchange is not None:
            self.exchange.put_grads(("B", stage - 1, index), item.received)
        else:
            self.p2p.send_grads(item.received, self.rank_of_stage(stage - 1), label)


class _ActivationMemory:
    """Bytes of the tensors each in-flight micro-batch saved for its backward (parameters excluded), and the peak of
    their sum over a step: what a schedule's in-flight micro-batches cost in memory, on any device."""

    # A hook on every saved tensor costs ~30 µs each: count the first steps, then one in SAMPLE_EVERY, and report
    # the last count in between (activation memory follows the shapes, which change little from step to step).
    FIRST_STEPS = 3
    SAMPLE_EVERY = 25

    def __init__(self) -> None:
        self.params: set[int] | None = None
        self.held: dict[Any, int] = {}  # bytes by in-flight (micro-batch, stage)
        self.peak = 0
        self.steps = 0

    def due(self) -> bool:
        """Whether this training step counts its activation memory."""
        self.steps += 1
        return self.steps <= self.FIRST_STEPS or self.steps % self.SAMPLE_EVERY == 0

    def start(self, param_storages: set[int] | None) -> None:
        self.params, self.held = param_storages, {}
        if param_storages is not None:
            self.peak = 0

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

"""``schedule="auto"``: the schedule whose simulated step is fastest on the measured layer costs, within memory.

Each candidate (1F1B, zero-bubble, interleaved 1F1B with 2 stages per rank, GPipe) gets its own time-balanced split
of the measured layers; then every rank's action order is played out on those stage times (a forward costs a third
of a layer's forward+backward time, a backward the rest; zero-bubble's backward defers half of itself, the weight
gradients, into the rank's waits), giving the step time, and the micro-batches in flight give each rank's peak
memory. The fastest candidate whose memory fits ``max_memory`` wins; within 1% the one holding less memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_mp.plan.cost_model import TRAINING_COPIES, StageCostModel
from lightning_mp.plan.partition import InfeasiblePartition, optimal_partition
from lightning_mp.plan.profiling import LayerCosts
from lightning_mp.plan.schedules import DEFERRING, Action, build_schedule, needs, play_out, stage_ranks

FORWARD_SHARE = 1 / 3  # of a layer's forward+backward time (the backward computes two matrix products)
DEFERRED_SHARE = 0.5  # of a backward: the weight-gradient half that zero_bubble runs later
# (schedule, stages per rank): zero_bubble with 2 is interleaved zero bubble
CANDIDATES = (
    ("1f1b", 1),
    ("zero_bubble", 1),
    ("zero_bubble_v", 2),
    ("zero_bubble", 2),
    ("interleaved_1f1b", 2),
    ("gpipe", 1),
)


@dataclass
class ScheduleEstimate:
    """One candidate's predicted step."""

    schedule: str
    virtual_stages: int
    balance: list[int]
    step_time: float  # seconds
    peak_memory: float  # bytes, the largest over the ranks

    @property
    def label(self) -> str:
        """The schedule's name, with its stages per rank where the name alone does not fix them."""
        return (
            f"{self.schedule} (virtual_stages={self.virtual_stages})"
            if self.schedule == "zero_bubble" and self.virtual_stages > 1
            else self.schedule
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "schedule": self.schedule,
            "virtual_stages": self.virtual_stages,
            "balance": self.balance,
            "step_time_s": self.step_time,
            "peak_memory_bytes": self.peak_memory,
        }


def estimate_schedules(
    costs: LayerCosts,
    layer_param_bytes: Sequence[int],
    pre_param_bytes: int,
    post_param_bytes: int,
    pipeline_parallel_size: int,
    microbatches: int,
    can_defer: bool,
) -> list[ScheduleEstimate]:
    """The predicted step of every candidate schedule that applies (zero_bubble needs ``can_defer``, interleaving
    twice as many layers as ranks)."""
    p, layers = pipeline_parallel_size, len(costs.layer_time)
    estimates = []
    for schedule, chunks in CANDIDATES:
        if (schedule in DEFERRING and not can_defer) or layers < chunks * p:
            continue
        placement = stage_ranks(schedule, p, chunks)
        v_stages = p * chunks
        model = StageCostModel(
            costs, layer_param_bytes, pre_param_bytes, post_param_bytes, v_stages, schedule, microbatches
        )
        try:
            balance = optimal_partition(layers, v_stages, model.time)
        except InfeasiblePartition:
            continue
        bounds = [sum(balance[:k]) for k in range(v_stages + 1)]
        times = [model.time(k, bounds[k], bounds[k + 1]) for k in range(v_stages)]
        params = [_params(model, k, bounds[k], bounds[k + 1]) for k in range(v_stages)]
        acts = [_activations(costs, k, v_stages, bounds[k], bounds[k + 1]) for k in range(v_stages)]
        orders = [build_schedule(schedule, r, p, microbatches, chunks) for r in range(p)]
        deferred = DEFERRED_SHARE if schedule in DEFERRING else 0.0
        step = simulate_step(orders, times, deferred)
        memory = max(
            TRAINING_COPIES * sum(params[k] for k in range(v_stages) if placement[k] == r)
            + _peak_in_flight(orders[r], acts)
            for r in range(p)
        )
        estimates.append(ScheduleEstimate(schedule, chunks, balance, step, memory))
    return estimates


def pick_schedule(estimates: Sequence[ScheduleEstimate], max_memory: float | None = None) -> ScheduleEstimate:
    """The fastest estimate that fits ``max_memory`` (when none fits: the leanest); within 1% the leaner one."""
    fitting = [e for e in estimates if max_memory is None or e.peak_memory <= max_memory]
    if not fitting:
        return min(estimates, key=lambda e: e.peak_memory)
    fastest = min(e.step_time for e in fitting)
    close = [e for e in fitting if e.step_time <= 1.01 * fastest]
    return min(close, key=lambda e: (e.peak_memory, e.step_time))


def simulate_step(
    orders: Sequence[Sequence[Action]], stage_times: Sequence[float], deferred_share: float = 0.0
) -> float:
    """Seconds from the first forward to the last backward when each rank runs its order, an action starting once
    its rank is free and its input is there; ``deferred_share`` of each backward waits and fills idle time."""
    finish: dict[tuple[str, int, int], float] = {}
    free = [0.0] * len(orders)
    owed = [0.0] * len(orders)  # deferred weight-gradient seconds a rank still has to run
    for r, a in play_out(orders, len(stage_times)):
        ready = max([finish[n] for n in needs(a, len(stage_times))], default=0.0)
        if ready > free[r] and owed[r] > 0:  # fill the wait with deferred work
            filled = min(ready - free[r], owed[r])
            owed[r] -= filled
            free[r] += filled
        start = max(free[r], ready)
        cost = stage_times[a.stage] * (FORWARD_SHARE if a.kind == "F" else 1 - FORWARD_SHARE)
        if a.kind == "B" and deferred_share:
            owed[r] += cost * deferred_share
            cost *= 1 - deferred_share
        free[r] = start + cost
        finish[(a.kind, a.microbatch, a.stage)] = free[r]
    return max(f + o for f, o in zip(free, owed))


def _params(model: StageCostModel, stage: int, start: int, end: int) -> float:
    params = sum(model.layer_param_bytes[start:end])
    if stage == 0:
        params += model.pre_param_bytes
    if stage == model.num_stages - 1:
        params += model.post_param_bytes
    return params


def _activations(costs: LayerCosts, stage: int, num_stages: int, start: int, end: int) -> float:
    acts = sum(costs.layer_activation_bytes[start:end])
    if stage == 0:
        acts += costs.pre_activation_bytes
    if stage == num_stages - 1:
        acts += costs.post_activation_bytes
    return acts


def _peak_in_flight(order: Sequence[Action], acts: Sequence[float]) -> float:
    """The most activation bytes a rank holds: forwards whose backward has not run yet."""
    held = peak = 0.0
    for a in order:
        held += acts[a.stage] if a.kind == "F" else -acts[a.stage]
        peak = max(peak, held)
    return peak

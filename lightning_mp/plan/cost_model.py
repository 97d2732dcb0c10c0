"""Predicting a split's cost from measured layer costs: per-stage time and memory, step time, bubble, imbalance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lightning_mp.plan.profiling import LayerCosts

# Seconds per byte a stage spends on a boundary message, measured for gloo on CPU (about 0.5 ms per MiB one way);
# NCCL is far faster, so on GPUs this overstates communication, which is small next to compute either way.
COMM_SECONDS_PER_BYTE = 0.5e-3 / 2**20

# Bytes per parameter byte held for training: the parameter, its gradient and an Adam-like optimizer's two states.
# The optimizer is built after the split, so the memory balance assumes Adam.
TRAINING_COPIES = 4


def in_flight(schedule: str, stage: int, num_stages: int, microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak: GPipe all m, 1F1B at most p - stage."""
    if schedule in ("1f1b", "zero_bubble"):
        return min(num_stages - stage, microbatches)
    if schedule == "none":
        return 1
    return microbatches


@dataclass
class StageCostModel:
    """Cost functions over layer ranges, built from one micro-batch's measured :class:`LayerCosts`."""

    costs: LayerCosts
    layer_param_bytes: Sequence[int]
    pre_param_bytes: int
    post_param_bytes: int
    num_stages: int
    schedule: str
    microbatches: int

    def time(self, stage: int, start: int, end: int) -> float:
        """Forward+backward seconds of one micro-batch on ``stage`` running layers ``[start, end)``, including the
        messages at its boundaries (activation out and gradient in after ``end``, the reverse before ``start``)."""
        c = self.costs
        t = sum(c.layer_time[start:end])
        if stage == 0:
            t += c.pre_time
        if stage == self.num_stages - 1:
            t += c.post_time
        sizes = c.layer_output_bytes
        if sizes:
            if start > 0:
                t += 2 * COMM_SECONDS_PER_BYTE * sizes[start - 1]
            if end < len(sizes):
                t += 2 * COMM_SECONDS_PER_BYTE * sizes[end - 1]
        return t

    def memory(self, stage: int, start: int, end: int) -> float:
        """Peak bytes of ``stage``: training copies of its parameters plus the activations it keeps in flight."""
        c = self.costs
        params = sum(self.layer_param_bytes[start:end])
        acts = sum(c.layer_activation_bytes[start:end])
        if stage == 0:
            params += self.pre_param_bytes
            acts += c.pre_activation_bytes
        if stage == self.num_stages - 1:
            params += self.post_param_bytes
            acts += c.post_activation_bytes
        return TRAINING_COPIES * params + acts * in_flight(self.schedule, stage, self.num_stages, self.microbatches)

    def function(self, balance: str, max_memory: float | None = None) -> Callable[[int, int, int], float]:
        """The stage cost that ``balance`` minimizes; with ``max_memory``, splits over it cost infinity."""
        cost = self.time if balance == "time" else self.memory
        if max_memory is None:
            return cost

        def limited(stage: int, start: int, end: int) -> float:
            return cost(stage, start, end) if self.memory(stage, start, end) <= max_memory else float("inf")

        return limited


@dataclass
class PlanPrediction:
    """What a split is expected to cost per step."""

    stage_time: list[float]  # seconds per micro-batch (forward + backward)
    stage_memory: list[float]  # peak bytes
    step_time: float  # seconds per step
    bubble: float  # fraction of stage-time idle in a step
    imbalance: float  # slowest stage / mean stage

    @classmethod
    def of(cls, model: StageCostModel, balance: Sequence[int]) -> PlanPrediction:
        bounds, start = [], 0
        for count in balance:
            bounds.append((start, start + count))
            start += count
        times = [model.time(s, a, b) for s, (a, b) in enumerate(bounds)]
        memory = [model.memory(s, a, b) for s, (a, b) in enumerate(bounds)]
        m = 1 if model.schedule == "none" else model.microbatches
        # the first micro-batch crosses every stage; the others follow at the pace of the slowest stage
        step = sum(times) + (m - 1) * max(times)
        busy = m * sum(times)
        return cls(times, memory, step, 1.0 - busy / (len(times) * step), max(times) / (sum(times) / len(times)))

"""Watching the pipeline while it trains: per-stage utilization and bubble as metrics, and a better split when the
stages are measurably imbalanced.

Each step, every stage reports its busy time (forward and backward compute), its time blocked on receives and its
step time (on GPUs also its utilization as NVML reports it, :func:`stage_utilization`); all stages' reports reach
every rank, so every rank logs the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_mp.observe.stats import StepStats
from lightning_mp.plan.partition import optimal_balance
from lightning_mp.runtime import clock

# Forward + backward ≈ 3 × forward for the matrix products that dominate a layer (backward computes two of them).
BACKWARD_FACTOR = 3.0


def measured_bubble(stats: list[StepStats]) -> float:
    """The idle share of one step over all stages: 1 − Σ busy / (stages × the longest stage's step time)."""
    wall = max(s.wall for s in stats) or 1e-12
    return 1.0 - sum(s.busy for s in stats) / (len(stats) * wall)


@dataclass
class StageMonitor:
    """Accumulates all stages' step statistics and turns them into metrics and balance advice.

    Args:
        balance: the current layer counts per stage.
        threshold: advise a new split when the busiest stage exceeds the mean by this fraction.
        warmup: steps left out (the first ones are slow).
    """

    balance: list[int]
    advise: bool = True  # False: metrics only (virtual stages: a rank's layers are not one contiguous run)
    threshold: float = 0.15
    warmup: int = 2
    steps: int = 0
    busy_sum: list[float] = field(default_factory=list)
    layer_forward_sum: list[float] = field(default_factory=list)  # every layer, in order

    def update(self, stats: list[StepStats]) -> dict[str, float]:
        """Record one step's statistics of every stage (in stage order); return the step's metrics."""
        self.steps += 1
        wall = max(s.wall for s in stats) or 1e-12
        metrics = {}
        for stage, s in enumerate(stats):
            metrics[f"pipeline/stage{stage}_busy_s"] = s.busy
            metrics[f"pipeline/stage{stage}_wait_s"] = s.wait
            metrics[f"pipeline/stage{stage}_utilization"] = s.busy / wall
        metrics["pipeline/bubble"] = measured_bubble(stats)
        if self.steps > self.warmup:
            if not self.busy_sum:
                self.busy_sum = [0.0] * len(stats)
            self.busy_sum = [a + s.busy for a, s in zip(self.busy_sum, stats)]
            layer_forward = [t for s in stats for t in s.layer_forward]
            if len(layer_forward) == sum(self.balance):
                if not self.layer_forward_sum:
                    self.layer_forward_sum = [0.0] * len(layer_forward)
                self.layer_forward_sum = [a + t for a, t in zip(self.layer_forward_sum, layer_forward)]
        return metrics

    @property
    def imbalance(self) -> float:
        """Busiest stage's mean busy time over the mean stage's (1.0 = balanced; 0 before any measurement)."""
        if not self.busy_sum or not any(self.busy_sum):
            return 0.0
        return max(self.busy_sum) / (sum(self.busy_sum) / len(self.busy_sum))

    def suggestion(self) -> list[int] | None:
        """A better split, if the measured imbalance exceeds the threshold and the estimate says it helps.

        A layer is estimated to cost ``BACKWARD_FACTOR`` times its measured forward time; what a stage's busy time
        holds beyond its layers (embeddings on the first stage, head and loss on the last) stays with that stage.
        Without per-layer timings, each layer costs its stage's busy time divided by its layer count.
        """
        if not self.advise or self.imbalance <= 1.0 + self.threshold:
            return None
        p = len(self.balance)
        if self.layer_forward_sum:
            costs = [BACKWARD_FACTOR * t for t in self.layer_forward_sum]
            extras, start = [], 0
            for busy, count in zip(self.busy_sum, self.balance):
                extras.append(max(0.0, busy - sum(costs[start : start + count])))
                start += count
            better = optimal_balance(costs, p, extras[0], extras[-1] if p > 1 else 0.0)
        else:
            costs = [busy / count for busy, count in zip(self.busy_sum, self.balance) for _ in range(count)]
            better = optimal_balance(costs, p)
        return better if better != self.balance else None


def reads_utilization(device: torch.device) -> bool:
    """Whether a stage on ``device`` reads its GPU utilization each step: on a GPU only (alike on every rank: one
    job runs on one kind of accelerator)."""
    return device.type == "cuda"


def stage_utilization(device: torch.device) -> float | None:
    """This stage's GPU utilization as NVML reports it (``nvidia-smi``'s GPU-Util, percent), read once per training
    step and shared with the step's statistics (no collective of its own); None on a CPU or without NVML."""
    return clock.device_utilization(device) if reads_utilization(device) else None

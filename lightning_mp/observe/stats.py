"""What one stage measured during one step: the record the monitor, the timeline and the summary read."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # NVML GPU-Util (percent) of the stage's device, read once after the step; None on a CPU or without NVML
    utilization: float | None = None

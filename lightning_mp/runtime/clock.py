"""Device time: how long a stage computed and waited, as the device saw it, on any device.

Why: on a GPU the host only launches kernels, so ``perf_counter`` around a forward measures launch time, not the
work. :class:`EventClock` records CUDA events on the current stream instead and reads them once, at the end of a
step (one synchronisation per step, where the step's statistics are gathered anyway); :class:`HostClock` is
``perf_counter`` where the host does the work (CPU). A span is two marks; :meth:`Clock.seconds` turns marks into
seconds since the step's origin, mapped onto the host's clock so that stages' timelines line up. Set-up
measurement, which runs once, uses :func:`synchronized_timer` (synchronise, then read the host clock).
:func:`device_utilization` reports what ``nvidia-smi`` shows as GPU-Util, where NVML is available.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


class HostClock:
    """``perf_counter`` marks (CPU: the host computes, so host time is device time)."""

    def start_step(self) -> None:
        """Mark the step's origin (nothing to do on the host)."""

    def mark(self) -> Any:
        return time.perf_counter()

    def seconds(self, marks: Sequence[Any]) -> list[float]:
        """``marks`` as host-clock seconds."""
        return list(marks)


class EventClock:
    """CUDA events on the current stream; read back (one synchronisation) in :meth:`seconds`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._origin: Any = None
        self._origin_host = 0.0

    def start_step(self) -> None:
        """Record the step's origin event and the host time it was recorded at."""
        self._origin = self.mark()
        self._origin_host = time.perf_counter()

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, marks: Sequence[Any]) -> list[float]:
        """``marks`` as seconds on the host's clock: the origin's host time plus the device time since it."""
        if not marks:
            return []
        if self._origin is None:
            self.start_step()
        marks[-1].synchronize()
        origin, host = self._origin, self._origin_host
        return [host + origin.elapsed_time(m) / 1000.0 for m in marks]


Clock = HostClock | EventClock


def clock_for(device: torch.device) -> Clock:
    """The clock that measures work on ``device``: CUDA events on a GPU, the host clock elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available():
        return EventClock(device)
    return HostClock()


def synchronized_timer(device: torch.device | None) -> Callable[[], float]:
    """A ``perf_counter`` that first waits for ``device``'s queued work (for measurements that run once)."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def device_utilization(device: torch.device) -> float | None:
    """Percent of the last sample period the GPU was busy, as NVML reports it (``nvidia-smi``'s GPU-Util); None on
    a CPU or without NVML (``pip install nvidia-ml-py``)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no NVML, or a device it cannot query (MIG)
        return None

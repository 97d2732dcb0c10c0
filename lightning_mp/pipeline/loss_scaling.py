"""fp16 loss scaling across stages: one process's ``GradScaler`` semantics when the backward is split over ranks.

Why: under ``precision="16-mixed"`` Lightning's ``MixedPrecision`` plugin unscales the gradients (divides them by the
scale) before the optimizer step and skips the step when a gradient is inf/NaN. The pipeline back-propagates inside
``training_step``, so it must scale every micro-batch's backward loss itself (the gradients other stages receive are
then scaled alike), and the ranks must agree on whether the step overflowed: one stage may hold the only inf (its
weights' gradients overflowed, the activation gradient it sent back did not). Each rank's scaler decides alone in
``unscale_``/``step``/``update``, so after the gradient reductions every rank learns whether any rank found an
inf/NaN (one all-reduce of a flag over the world), and a rank that found none but must skip puts one inf into one of
its own gradients: its scaler then skips the step and lowers the scale exactly as the others do, through
``GradScaler``'s public path only (no private state touched).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def loss_scaler_of(precision_plugin: Any) -> Any:
    """The plugin's ``GradScaler`` (``MixedPrecision("16-mixed", ...)``), or None (bf16, fp32, true half)."""
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler if scaler is not None and hasattr(scaler, "scale") and hasattr(scaler, "unscale_") else None


def local_overflow(grads: Sequence[Tensor]) -> bool | Tensor:
    """Whether any of ``grads`` holds an inf or NaN, as a 0-d tensor (no host read); False without gradients.

    The largest magnitude per gradient (no sum of squares, which could overflow for large finite values)."""
    if not grads:
        return False
    peaks = torch._foreach_norm(list(grads), float("inf"))
    return ~torch.isfinite(torch.stack([p.float() for p in peaks])).all()


def agree_on_overflow(params: Sequence[Tensor], device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """After the gradient reductions, before ``scaler.unscale_``: make every rank's scaler see an inf when any rank's
    gradients hold one. Returns whether the step overflowed anywhere (one host read, once per optimizer step)."""
    grads = [p.grad for p in params if p.grad is not None]
    found = local_overflow(grads)
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    if isinstance(found, Tensor):
        flag += found.to(device=device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    overflow = bool(flag.item())
    if overflow and grads and not bool(found):  # another rank overflowed: skip and back off alike
        grads[0].view(-1)[:1].fill_(float("inf"))
    return overflow

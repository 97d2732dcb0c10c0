"""Splitting a backward pass in two: input gradients now, weight gradients later (the zero-bubble idea).

A stage's backward of micro-batch ``i`` produces two things: the gradient of its input, which the previous stage is
waiting for, and the gradients of its weights, which nobody needs before the optimizer step. Under
``schedule="zero_bubble"`` the stage's ``nn.Linear`` layers (the bulk of a transformer's FLOPs) compute only the
input gradient in the backward and queue the weight-gradient product; the executor runs queued products while it
would otherwise wait on a receive, and the rest before the step ends. The products are the ones autograd would
compute (``grad_out^T @ input``), accumulated into ``.grad`` the same way, so the numbers do not change.

Only plain ``nn.Linear`` modules of the stage's own layers are deferred; every other parameter gets its gradient in
the backward as usual. Under autocast the product is deferred too, computed as autocast computes it: on the inputs
and weight cast to the autocast dtype (the casts stay in the graph, so the input gradient flows back through them),
the deferred weight gradient cast back to the parameter's dtype before it is accumulated, as a cast's backward does.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class DeferredWeightGrads:
    """The queue of weight-gradient products of the stage's linear layers, per micro-batch."""

    def __init__(self) -> None:
        self.enabled = False  # defer during this step's forwards/backwards (zero_bubble training steps only)
        self.microbatch = -1  # the micro-batch whose forward or backward is running
        self.pending: OrderedDict[int, list[tuple[Tensor, Tensor | None, Tensor, Tensor]]] = OrderedDict()
        self._linear = _deferring_linear_class(self)

    def install(self, modules: list[nn.Module]) -> None:
        """Route the forward of each plain ``nn.Linear`` among ``modules`` (and their children) through the queue."""
        for module in modules:
            for sub in module.modules():
                if type(sub) is nn.Linear:
                    sub.__class__ = self._linear
                    sub._lmp_deferred = self  # type: ignore[assignment]  # (tensor-parallel layers defer through it)

    def defers(self, weight: Tensor, inputs: Tensor) -> bool:
        """Whether a linear layer's product with ``weight`` defers its weight gradient now."""
        return self.enabled and torch.is_grad_enabled() and weight.requires_grad

    def linear(self, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``F.linear``, its weight (and bias) gradient queued when deferring."""
        if not self.defers(weight, inputs):
            return F.linear(inputs, weight, bias)
        device = inputs.device.type
        if not torch.is_autocast_enabled(device):
            return _LinearInputGradOnly.apply(inputs, weight, bias, self, self.microbatch, weight, bias)
        dtype = torch.get_autocast_dtype(device)  # autocast runs linear in its lower precision: cast as it would
        cast = [t if t is None else t.to(dtype) for t in (inputs, weight, bias)]
        with torch.autocast(device, enabled=False):
            return _LinearInputGradOnly.apply(*cast, self, self.microbatch, weight, bias)

    def defer(self, microbatch: int, weight: Tensor, bias: Tensor | None, inputs: Tensor, grad_out: Tensor) -> None:
        self.pending.setdefault(microbatch, []).append((weight, bias, inputs, grad_out))

    def has_pending(self) -> bool:
        return bool(self.pending)

    def run_one(self) -> int:
        """Compute the oldest queued product; return its micro-batch."""
        microbatch, items = next(iter(self.pending.items()))
        weight, bias, inputs, grad_out = items.pop(0)
        if not items:
            del self.pending[microbatch]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        _accumulate_product(weight, g.t(), inputs.reshape(-1, inputs.shape[-1]))
        if bias is not None:
            _accumulate(bias, g.sum(0).to(bias.dtype))
        return microbatch

    def clear(self) -> None:
        self.pending.clear()
        self.enabled = False


def _accumulate_product(param: Tensor, a: Tensor, b: Tensor) -> None:
    """``param.grad += a @ b``: into the existing gradient by one fused multiply-add when the dtypes agree (no
    temporary of the weight's size, no separate addition pass: Megatron's gradient-accumulation fusion), else as
    autograd would accumulate it."""
    grad = param.grad
    if grad is not None and grad.dtype == a.dtype == b.dtype and grad.layout == torch.strided:
        with torch.no_grad():
            grad.addmm_(a, b)
        return
    _accumulate(param, a.mm(b).to(param.dtype))


def _accumulate(param: Tensor, grad: Tensor) -> None:
    with torch.no_grad():
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


class _LinearInputGradOnly(torch.autograd.Function):
    """``F.linear`` whose backward returns the input gradient and queues the weight and bias gradients.

    ``weight``/``bias`` are what the product uses (under autocast, the parameters' casts), ``param``/``bias_param``
    the parameters whose ``.grad`` receives the queued gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        inputs: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        queue: Any,
        microbatch: int,
        param: Tensor,
        bias_param: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(inputs)
        # the parameters themselves, not saved tensors: a saved tensor may come back as an alias (saved-tensor
        # hooks), and the queued gradient must land in the parameter's own .grad
        ctx.weight, ctx.param, ctx.bias, ctx.queue, ctx.microbatch = weight, param, bias_param, queue, microbatch
        return F.linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:
        (inputs,) = ctx.saved_tensors
        grad_in = grad_out.matmul(ctx.weight) if ctx.needs_input_grad[0] else None
        ctx.queue.defer(ctx.microbatch, ctx.param, ctx.bias if ctx.needs_input_grad[2] else None, inputs, grad_out)
        return grad_in, None, None, None, None, None, None


def _deferring_linear_class(queue: DeferredWeightGrads) -> type[nn.Linear]:
    class Linear(nn.Linear):
        def forward(self, inputs: Tensor) -> Tensor:
            return queue.linear(inputs, self.weight, self.bias)

    Linear.__module__, Linear.__qualname__ = nn.Linear.__module__, nn.Linear.__qualname__
    return Linear

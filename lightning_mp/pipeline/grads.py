"""Gradients across ranks: hand-over to Lightning's backward, tied weights, data parallelism, global-norm clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class GradStash:
    """Keeps the gradients a pipeline step produced apart from ``.grad`` until Lightning's ``backward`` asks.

    Lightning zeroes the gradients between ``training_step`` and ``backward``; the pipeline back-propagates inside
    ``training_step``. So the step's gradients are set aside (and the accumulated ones put back), and ``restore``
    adds them in where Lightning's ``backward`` would have.
    """

    def __init__(self) -> None:
        self._step_grads: list[tuple[nn.Parameter, Tensor]] = []
        self._held: list[tuple[nn.Parameter, Tensor | None]] = []

    def begin(self, params: Iterable[nn.Parameter]) -> None:
        """Before the step: set the accumulated gradients aside so the step starts from none."""
        self._step_grads = []  # a skipped step's gradients (no backward followed) are dropped
        self._held = [(p, p.grad) for p in params]
        for p, _ in self._held:
            p.grad = None

    def end(self, scale: float = 1.0) -> None:
        """After the step: take its gradients out (multiplied by ``scale``) and put the accumulated ones back."""
        self._step_grads = [(p, p.grad) for p, _ in self._held if p.grad is not None]
        if scale != 1.0 and self._step_grads:  # (a stage with nothing to train has none)
            torch._foreach_mul_([g for _, g in self._step_grads], scale)
        for p, held in self._held:
            p.grad = held
        self._held = []

    def held_grads(self) -> dict[int, Tensor]:
        """During a step: the gradients accumulated before it, by parameter id."""
        return {id(p): g for p, g in self._held if g is not None}

    def step_grads(self) -> dict[int, Tensor]:
        """After a step: its gradients (scaled), by parameter id, still to be handed over."""
        return {id(p): g for p, g in self._step_grads}

    def take(self) -> dict[int, Tensor]:
        """After a step: its gradients, taken over by someone else (``restore`` then adds nothing)."""
        taken = self.step_grads()
        self._step_grads = []
        return taken

    def restore(self) -> None:
        """In Lightning's ``backward``: add the step's gradients to ``.grad`` (which Lightning may have zeroed)."""
        for p, g in self._step_grads:
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        self._step_grads = []


def all_reduce_grads(params: Sequence[nn.Parameter], group: dist.ProcessGroup, op: str) -> None:
    """Sum ("sum") or average ("avg") the gradients of ``params`` over ``group`` in one flat message.

    A parameter without a gradient on a rank counts as zeros there, and gets a gradient only where some rank had one
    (so optimizers keep skipping parameters no rank used).
    """
    if not params:
        return
    flat = [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        for p in params
    ]
    present = torch.tensor([p.grad is not None for p in params], dtype=flat[0].dtype, device=flat[0].device)
    buffer = torch.cat([*flat, present])
    dist.all_reduce(buffer, group=group)
    if op == "avg":
        buffer[: -len(params)].div_(dist.get_world_size(group))
    offset = 0
    for p, was_present in zip(params, buffer[-len(params) :].tolist()):
        chunk = buffer[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if was_present:
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)


def clip_by_global_norm(
    params: Sequence[nn.Parameter], max_norm: float, group: dist.ProcessGroup | None, counted: set[int]
) -> Tensor:
    """Clip the gradients of ``params`` by the 2-norm over every stage, as one process would over the whole model.

    Only parameters whose id is in ``counted`` add to the norm (a tied weight, present on two stages, counts once);
    all of ``params`` are scaled. Returns the total norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [p.grad for p in params if p.grad is not None and id(p) in counted]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for g in local:
        sq += torch.linalg.vector_norm(g, 2).double() ** 2
    if group is not None:
        dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if not math.isclose(float(coef), 1.0):
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total.float()


@dataclass
class GradientSync:
    """The gradient reductions of one rank after its step, and the global norm for clipping.

    ``shared``: tied parameters with the group of the stages using them (summed); ``partial``: parameters kept whole
    inside tensor-parallel blocks, whose gradient each tp rank only partly computed (summed over ``tp_group``);
    ``dp_group``: the data-parallel replicas (averaged); ``norm_group`` with ``norm_skip``: the ranks a global norm
    spans, and the parameters counted on another rank (a tied copy, a replica on another tp rank).
    """

    shared: list[tuple[list[nn.Parameter], dist.ProcessGroup]] = field(default_factory=list)
    partial: list[nn.Parameter] = field(default_factory=list)
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    norm_group: dist.ProcessGroup | None = None
    norm_skip: set[int] = field(default_factory=set)
    # with dp > 1: the bucketed, overlapped reduction (and sharded optimizer) of pipeline/sharding.py
    sharding: Any = None

    def sum_late(self) -> None:
        """Sum tied and tensor-parallel partial gradients over the ranks that each computed a part of them."""
        for tied, group in self.shared:
            all_reduce_grads(tied, group, "sum")
        if self.partial and self.tp_group is not None:
            all_reduce_grads(self.partial, self.tp_group, "sum")

    def late_params(self) -> set[int]:
        """Ids of the parameters :meth:`sum_late` sums: reduced over the replicas only after it."""
        return {id(p) for tied, _ in self.shared for p in tied} | {id(p) for p in self.partial}

    def sync(self, params: Sequence[nn.Parameter]) -> None:
        """Sum tied and partial gradients, then average ``params``' gradients over the replicas (with bucketed
        reduction: wait for the buckets the step launched, which summed the tied and partial ones first)."""
        if self.sharding is not None:
            self.sharding.finish()
            return
        self.sum_late()
        if self.dp_group is not None:
            all_reduce_grads([p for p in params if p.requires_grad], self.dp_group, "avg")

    def clip(self, params: Sequence[nn.Parameter], max_norm: float) -> None:
        """Clip ``params`` by the norm over every stage and tp rank of the replica (sharded: over the shards)."""
        if self.sharding is not None and self.sharding.level != "none":
            self.sharding.clip(max_norm, self.norm_group, self.norm_skip)
            return
        clip_by_global_norm(list(params), max_norm, self.norm_group, {id(p) for p in params} - self.norm_skip)

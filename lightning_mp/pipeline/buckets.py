"""Data-parallel gradient reduction in flat buckets, launched while the backward still runs (as DDP does).

Why buckets: one collective per parameter costs a latency each, one over every gradient needs a copy of all of them;
DDP's answer is ~25 MiB flat buckets, each launched asynchronously as soon as its last gradient is in. Here a step
runs several micro-batches' backwards, so a parameter's gradient is complete only after its last accumulation of the
step: :class:`BucketReducer` counts accumulations per parameter (``register_post_accumulate_grad_hook``), learns how
many a step makes (the first step), and in the last step of an accumulation window launches each bucket, in a fixed
order, when all its parameters have had theirs. Such an early launch assumes the step's gradient scale is 1 (a loss
weighed by samples); with a token-mean loss the scale ``ref / ΣN`` is known only after the step, and so are the
gradients zero-bubble computes outside autograd: every bucket whose content changed after its launch (checked by the
gradient's identity and version) is launched again once the step is done. The replicas agree on which (one small
all-reduce), so every rank issues the same collectives in the same order.

Levels: ``"none"`` and ``"optimizer"`` all-reduce each bucket (every rank gets the whole averaged gradient);
``"gradients"`` and ``"full"`` reduce-scatter it (each rank gets its shard of the average, ``shard_range``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclass
class Bucket:
    """Parameters reduced as one flat tensor: each at its offset, the whole padded to a multiple of the replicas."""

    index: int
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    sizes: list[int]  # each parameter's element count (kept: a released parameter has none)
    numel: int  # padded
    group: int  # the optimizer parameter group its parameters belong to
    late: bool  # tied or tensor-parallel partial parameters: reduced only after their sums
    flat: Tensor | None = None  # this step's flat gradient, while it is being reduced
    out: Tensor | None = None  # reduce-scatter's output (this rank's shard)
    work: Any = None
    launched_from: list[tuple[Tensor | None, int]] = field(default_factory=list)  # (grad, version) at launch

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def shard_range(self, rank: int, world: int) -> tuple[int, int]:
        """The flat elements ``[start, end)`` replica ``rank`` owns."""
        size = self.numel // world
        return rank * size, (rank + 1) * size

    def param_range(self, i: int, rank: int, world: int) -> tuple[int, int]:
        """Elements ``[a, b)`` of parameter ``i`` (flattened) inside replica ``rank``'s shard (a == b: none)."""
        start, end = self.shard_range(rank, world)
        offset, n = self.offsets[i], self.sizes[i]
        a, b = max(start, offset) - offset, min(end, offset + n) - offset
        return (a, b) if a < b else (0, 0)


def build_buckets(
    groups: Sequence[Sequence[tuple[str, nn.Parameter]]], world: int, late: set[int], cap_bytes: int
) -> list[Bucket]:
    """Buckets of at most ``cap_bytes`` (a parameter larger than that gets its own), never mixing optimizer groups,
    dtypes or devices; parameters taken in reverse order (the order the backward completes them, as DDP does), the
    ``late`` ones (ids) in buckets of their own at the end. The same on every replica of a stage."""
    buckets: list[Bucket] = []
    for want_late in (False, True):
        for g, named in enumerate(groups):
            open_: dict[tuple[torch.dtype, torch.device], Bucket] = {}
            for name, p in reversed(list(named)):
                if (id(p) in late) != want_late:
                    continue
                key = (p.dtype, p.device)
                bucket = open_.get(key)
                size = p.numel() * p.element_size()
                if bucket is not None and (bucket.numel + p.numel()) * p.element_size() > cap_bytes and size:
                    bucket = None
                if bucket is None:
                    bucket = open_[key] = Bucket(len(buckets), [], [], [], [], 0, g, want_late)
                    buckets.append(bucket)
                bucket.params.append(p)
                bucket.names.append(name)
                bucket.offsets.append(bucket.numel)
                bucket.sizes.append(p.numel())
                bucket.numel += p.numel()
    for bucket in buckets:
        bucket.numel = -(-bucket.numel // world) * world
    return buckets


class BucketReducer:
    """Averages the gradients of ``buckets`` over ``group``, overlapped with the backward where it can.

    Args:
        buckets: from :func:`build_buckets`.
        group: the data-parallel group; ``rank``/``world`` this rank's place in it.
        scatter: reduce-scatter (each rank keeps its shard) rather than all-reduce.
    """

    def __init__(self, buckets: list[Bucket], group: dist.ProcessGroup, rank: int, world: int, scatter: bool) -> None:
        self.buckets = buckets
        self.group, self.rank, self.world, self.scatter = group, rank, world, scatter
        self.armed = False  # the current step ends an accumulation window: buckets may launch during its backward
        self._counts: dict[int, int] = {}
        self._expected: dict[int, int] | None = None  # accumulations per parameter per step, once learned
        self._held: dict[int, Tensor] = {}
        self._next = 0  # the next bucket to launch (they launch in index order on every rank)
        self.launched_early = 0  # buckets launched during a backward (over the run)
        self.relaunched = 0  # of those, launched again after the step because their gradients changed
        self._handles = [p.register_post_accumulate_grad_hook(self._accumulated) for b in buckets for p in b.params]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- during a step ------------------------------------------------------------------------------------------
    def begin_step(self, held: dict[int, Tensor], window_end: bool) -> None:
        """Before a step's first forward: ``held`` the gradients accumulated before it (by parameter id)."""
        self._counts, self._held, self._next = {}, held, 0
        self.armed = window_end and self._expected is not None

    def _accumulated(self, p: Tensor) -> None:
        self._counts[id(p)] = self._counts.get(id(p), 0) + 1
        if self.armed:
            self._launch_ready()

    def _complete(self, bucket: Bucket) -> bool:
        assert self._expected is not None
        return all(
            self._expected.get(id(p), 0) > 0 and self._counts.get(id(p), 0) == self._expected[id(p)]
            for p in bucket.params
        )

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.late or not self._complete(bucket):
                return
            self._launch(bucket, lambda i, p: (p.grad, self._held.get(id(p))))
            self._next += 1
            self.launched_early += 1

    # ---- after a step -------------------------------------------------------------------------------------------
    def end_step(
        self, step_grads: dict[int, Tensor], window_end: bool, sum_late: Callable[[], None] | None = None
    ) -> None:
        """After the step (its gradients ``step_grads`` already scaled, the held ones back in ``.grad``): learn the
        accumulation counts and, at a window's end, make ``.grad`` the final gradient, launch what is left and
        relaunch what changed. ``sum_late`` sums the tied and partial gradients (in ``.grad``) before their
        buckets launch."""
        self._expected = {
            id(p): (self._counts.get(id(p), 0) if id(p) in step_grads else 0) for b in self.buckets for p in b.params
        }
        self.armed = False
        if not window_end:
            return
        changed = [b.index for b in self.buckets[: self._next] if self._changed(b, step_grads)]
        for b in self.buckets:
            for p in b.params:
                step = step_grads.get(id(p))
                if step is not None and p.grad is not None:
                    step.add_(p.grad)
                p.grad = step if step is not None else p.grad
        if sum_late is not None:
            sum_late()
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next], lambda i, p: (p.grad, None))
            self._next += 1
        mask = torch.zeros(len(self.buckets), dtype=torch.int32)
        mask[changed] = 1
        dist.all_reduce(mask, group=self.group, op=dist.ReduceOp.MAX)
        for index in mask.nonzero().flatten().tolist():  # the same list on every replica
            bucket = self.buckets[index]
            bucket.work.wait()
            self._launch(bucket, lambda i, p: (p.grad, None))
            self.relaunched += 1

    @staticmethod
    def _changed(bucket: Bucket, step_grads: dict[int, Tensor]) -> bool:
        """Whether a gradient of ``bucket`` is not what it launched with (replaced, scaled or added to since)."""
        for p, (g, version) in zip(bucket.params, bucket.launched_from):
            now = step_grads.get(id(p))
            if now is not g or (g is not None and g._version != version):
                return True
        return False

    def _launch(self, bucket: Bucket, content: Callable[[int, nn.Parameter], tuple[Tensor | None, Tensor | None]]):
        """Copy the bucket's gradients (``content(i, p)``: a gradient and one to add, either may be None) into a
        fresh flat tensor and start its reduction."""
        flat = torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        bucket.launched_from = []
        for i, p in enumerate(bucket.params):
            grad, extra = content(i, p)
            bucket.launched_from.append((grad, grad._version if grad is not None else 0))
            piece = flat[bucket.offsets[i] : bucket.offsets[i] + bucket.sizes[i]]
            if grad is not None:
                piece.copy_(grad.reshape(-1))
            if extra is not None:
                piece.add_(extra.reshape(-1))
        bucket.flat = flat
        if self.scatter:
            bucket.out = torch.empty(bucket.numel // self.world, dtype=flat.dtype, device=flat.device)
            bucket.work = dist.reduce_scatter_single(bucket.out, flat, group=self.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)

    # ---- before the optimizer step ------------------------------------------------------------------------------
    def wait(self) -> list[Tensor]:
        """Wait for every bucket; returns each bucket's averaged result: the whole flat gradient (all-reduce) or
        this rank's shard (reduce-scatter). Gradients of the buckets' parameters are cleared."""
        results = []
        for bucket in self.buckets:
            if bucket.work is None:
                raise RuntimeError("BucketReducer.wait: a bucket was never launched (no window-ending step ran).")
            bucket.work.wait()
            result = bucket.out if self.scatter else bucket.flat
            assert result is not None
            results.append(result.div_(self.world))
            bucket.work = bucket.flat = bucket.out = None
            bucket.launched_from = []
            for p in bucket.params:
                p.grad = None
        return results

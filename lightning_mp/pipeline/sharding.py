"""Sharded data parallelism (ZeRO-1/2/3) for one stage: each replica keeps 1/dp of what it would replicate.

Why: with Adam in fp32 a replica holds its stage's parameters once, gradients once and optimizer state twice; the
data-parallel replicas all hold the same. ``data_parallel_sharding`` splits that over the replicas of a stage:

- ``"none"``: everything replicated; gradients averaged by an all-reduce of each bucket;
- ``"optimizer"`` (ZeRO-1): the optimizer keeps and updates only this rank's shard of each bucket (a flat
  parameter); the updated shards are all-gathered back into the parameters after the step;
- ``"gradients"`` (ZeRO-2): as ``"optimizer"``, and each bucket is reduce-scattered, so a rank keeps only its
  shard's gradient after the reduction;
- ``"full"`` (ZeRO-3): as ``"gradients"``, and between steps the parameters themselves are released: a rank keeps
  only its shards, gathered for a step's micro-batches (and for evaluation) and released after it.

The user's optimizer stays the one ``configure_optimizers`` built: its parameter groups are rebuilt over the flat
shards of that group's parameters (buckets never mix groups), so hyper-parameters and schedulers work as they
were. Exact for element-wise optimizers (SGD, Adam, AdamW, RMSprop...): every element is updated by the same
arithmetic as on one process; an optimizer that reads a whole tensor at once (LAMB, Adafactor) would see flat
shards instead. A parameter no replica gave a gradient to is stepped with a zero gradient at the sharded levels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.pipeline.buckets import DEFAULT_BUCKET_BYTES, Bucket, BucketReducer, build_buckets
from lightning_mp.pipeline.grads import GradStash

SHARDING_LEVELS = ("none", "optimizer", "gradients", "full")


def sharded_bytes(param_bytes: int, dp: int, level: str, optimizer_factor: float = 2.0) -> dict[str, int]:
    """Bytes per rank of parameters, gradients and optimizer state (``optimizer_factor`` × the parameters: 2 for
    Adam) for a stage of ``param_bytes`` at ``level`` with ``dp`` replicas (the ideal split, padding not counted)."""
    shard = -(-param_bytes // dp)
    optimizer = int(param_bytes * optimizer_factor)
    return {
        "parameters": shard if level == "full" else param_bytes,
        "gradients": shard if level in ("gradients", "full") else param_bytes,
        "optimizer": -(-optimizer // dp) if level != "none" else optimizer,
    }


def sharded_memory_report(stage_bytes: list[int], dp: int, level: str) -> dict[str, Any]:
    """Per stage, the bytes a rank holds at ``level`` (optimizer state as Adam's: 2 × the parameters), and the
    plan's text line for it."""
    stages = [sharded_bytes(b, dp, level) for b in stage_bytes]
    mib = lambda n: f"{n / 2**20:.3g} MiB"  # noqa: E731
    parts = [
        f"stage {s}: parameters {mib(m['parameters'])}, gradients {mib(m['gradients'])},"
        f" optimizer {mib(m['optimizer'])}"
        for s, m in enumerate(stages)
    ]
    text = f"  data parallel (dp={dp}, sharding={level}), per rank (optimizer as Adam's): " + "; ".join(parts)
    return {"level": level, "dp": dp, "per_rank": stages, "text": text}


class DataParallelSharding:
    """One stage's data-parallel reduction and, above ``"none"``, its sharded optimizer (and parameters).

    Args:
        module: the stage (its parameters keep their names).
        optimizer: the user's optimizer over the stage's parameters; rebuilt over flat shards above ``"none"``.
        level: one of :data:`SHARDING_LEVELS`.
        group, rank, world: the data-parallel group and this rank's place in it.
        late: ids of parameters whose gradients are summed over other ranks first (tied, tensor-parallel partial).
        bucket_bytes: the size of a reduction bucket.
    """

    def __init__(
        self, module: nn.Module, optimizer: Optimizer, level: str, group: dist.ProcessGroup, rank: int, world: int,
        late: set[int], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:  # fmt: skip
        names = {id(p): n for n, p in module.named_parameters()}
        self.level, self.group, self.rank, self.world = level, group, rank, world
        self.group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        groups = [[(names[id(p)], p) for p in g["params"] if p.requires_grad] for g in optimizer.param_groups]
        self.buckets = build_buckets(groups, world, late, bucket_bytes)
        self.reducer = BucketReducer(self.buckets, group, rank, world, scatter=level in ("gradients", "full"))
        self.shards: list[nn.Parameter] = []
        self.shapes = {id(p): p.shape for b in self.buckets for p in b.params}  # whole, also while released
        sharded = {id(p): n for b in self.buckets for n, p in zip(b.names, b.params)}
        # state-dict name -> the parameter's name in the buckets (a tied weight has one entry per module using it)
        self.aliases = {k: sharded[id(v)] for k, v in module.state_dict(keep_vars=True).items() if id(v) in sharded}
        self.gathered = True
        self.speculate = True  # buckets may launch during the backward (off while the dp group has other traffic)
        if level != "none":
            self.shards = [
                nn.Parameter(self._flat_values(b)[slice(*b.shard_range(rank, world))].clone()) for b in self.buckets
            ]
            for g, group_ in enumerate(optimizer.param_groups):
                group_["params"] = [s for s, b in zip(self.shards, self.buckets) if b.group == g]
        if level == "full":
            self.release()

    # ---- a training step ----------------------------------------------------------------------------------------
    def begin_step(self, stash: GradStash, window_end: bool) -> None:
        """Before the step's first forward (after ``stash.begin``)."""
        self.gather()
        self.reducer.begin_step(stash.held_grads(), window_end and self.speculate)

    def end_step(self, stash: GradStash, window_end: bool, sum_late: Callable[[], None]) -> None:
        """After the step (after ``stash.end``): at a window's end its gradients go to the buckets, not to Lightning."""
        step_grads = stash.take() if window_end else stash.step_grads()
        self.reducer.end_step(step_grads, window_end, sum_late)
        if window_end:
            for bucket in self.buckets:
                for p in bucket.params:
                    p.grad = None  # their content is in the buckets
            if self.level == "full":
                self.release()

    def finish(self) -> None:
        """Before the optimizer step: wait for the reductions and hand the results to the optimizer."""
        results = self.reducer.wait()
        for bucket, result in zip(self.buckets, results):
            if self.level == "none":
                for p, offset in zip(bucket.params, bucket.offsets):
                    p.grad = result[offset : offset + p.numel()].view_as(p)
            elif self.level == "optimizer":
                self.shards[bucket.index].grad = result[slice(*bucket.shard_range(self.rank, self.world))].clone()
            else:
                self.shards[bucket.index].grad = result

    def after_optimizer_step(self) -> None:
        """After the optimizer step: updated shards back into the parameters (``"optimizer"``/``"gradients"``), and
        every gradient cleared, so the next window starts from none."""
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
        for shard in self.shards:
            shard.grad = None
        if self.level in ("optimizer", "gradients"):
            for bucket, flat in self._all_gather():
                for p, offset in zip(bucket.params, bucket.offsets):
                    p.data.copy_(flat[offset : offset + p.numel()].view_as(p))

    # ---- parameters (level "full") ------------------------------------------------------------------------------
    def gather(self) -> None:
        """``"full"``: give every parameter its whole value again (a collective of the dp group)."""
        if self.gathered or self.level != "full":
            return
        for bucket, flat in self._all_gather():
            for p, offset in zip(bucket.params, bucket.offsets):
                shape = self.shapes[id(p)]
                p.data = flat[offset : offset + shape.numel()].view(shape)
        self.gathered = True

    def release(self) -> None:
        """``"full"``: free the parameters' memory; this rank keeps its shards only."""
        if not self.gathered or self.level != "full":
            return
        for bucket in self.buckets:
            for p in bucket.params:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.gathered = False

    @contextmanager
    def whole(self) -> Iterator[None]:
        """The parameters gathered for the duration (evaluation, saving, reading them); released again after."""
        was = self.gathered
        self.gather()
        try:
            yield
        finally:
            if not was:
                self.release()

    def refresh_shards(self) -> None:
        """Copy the parameters' values into the shards (after parameters were loaded from a checkpoint)."""
        if self.level in ("optimizer", "gradients"):
            for bucket, shard in zip(self.buckets, self.shards):
                shard.data.copy_(self._flat_values(bucket)[slice(*bucket.shard_range(self.rank, self.world))])

    # ---- clipping -----------------------------------------------------------------------------------------------
    def clip(self, max_norm: float, norm_group: dist.ProcessGroup | None, skip: set[int]) -> Tensor:
        """Clip the shards' gradients by the global 2-norm of the replica's gradients (each rank's shards summed over
        the dp group, then over the replica's stages and tp ranks); parameters in ``skip`` are counted elsewhere."""
        sq = torch.zeros((), dtype=torch.float64, device=self.buckets[0].device if self.buckets else None)
        for bucket, shard in zip(self.buckets, self.shards):
            if shard.grad is None:
                continue
            start = bucket.shard_range(self.rank, self.world)[0]
            for i, p in enumerate(bucket.params):
                a, b = bucket.param_range(i, self.rank, self.world)
                if a < b and id(p) not in skip:
                    at = bucket.offsets[i] + a - start
                    sq += torch.linalg.vector_norm(shard.grad[at : at + b - a], 2).double() ** 2
        dist.all_reduce(sq, group=self.group)
        if norm_group is not None:
            dist.all_reduce(sq, group=norm_group)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if float(coef) < 1.0:
            for shard in self.shards:
                if shard.grad is not None:
                    shard.grad.mul_(coef.to(shard.grad.dtype))
        return total.float()

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _flat_values(self, bucket: Bucket) -> Tensor:
        flat = torch.zeros(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        for p, offset in zip(bucket.params, bucket.offsets):
            flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))  # (gathered: whole)
        return flat

    def _all_gather(self) -> list[tuple[Bucket, Tensor]]:
        """Every bucket's whole flat value from the ranks' shards (launched together, then waited for)."""
        pending = []
        for bucket, shard in zip(self.buckets, self.shards):
            flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device)
            pending.append(
                (bucket, flat, dist.all_gather_single(flat, shard.detach(), group=self.group, async_op=True))
            )
        for _, _, work in pending:
            work.wait()
        return [(bucket, flat) for bucket, flat, _ in pending]

    def memory(self, optimizer: Optimizer) -> dict[str, int]:
        """Measured bytes on this rank: parameters (held now), gradients (at most, after the reduction), optimizer
        state."""
        params = sum(p.numel() * p.element_size() for b in self.buckets for p in b.params)  # 0 when released
        shard = sum(s.numel() * s.element_size() for s in self.shards)
        state = sum(
            v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)
        )
        grads = shard if self.level in ("gradients", "full") else params
        return {
            "parameters": params + (shard if self.level != "none" else 0),
            "gradients": grads,
            "optimizer": state,
            "buckets": len(self.buckets),
            "launched_early": self.reducer.launched_early,
            "relaunched": self.reducer.relaunched,
        }

    def named_parameter_ranges(self) -> Iterator[tuple[str, nn.Parameter, int, int, Bucket, int]]:
        """For each sharded parameter: (name, parameter, a, b, bucket, position in the bucket), ``[a, b)`` being the
        elements of it (flattened) in this rank's shard."""
        for bucket in self.buckets:
            for i, (name, p) in enumerate(zip(bucket.names, bucket.params)):
                a, b = bucket.param_range(i, self.rank, self.world)
                yield name, p, a, b, bucket, i

    def shard_piece(self, bucket: Bucket, i: int, flat: Tensor) -> Tensor:
        """Parameter ``i`` of ``bucket``'s elements in this rank's shard, out of a shard-sized flat tensor."""
        a, b = bucket.param_range(i, self.rank, self.world)
        at = bucket.offsets[i] + a - bucket.shard_range(self.rank, self.world)[0]
        return flat[at : at + b - a]

    def full_shape(self, p: nn.Parameter) -> torch.Size:
        """The parameter's shape on this rank (its tensor-parallel slice), also while released."""
        return self.shapes[id(p)]

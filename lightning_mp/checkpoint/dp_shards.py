"""Checkpoints of a sharded data-parallel stage, in the model's own names and full shapes.

Why: with ``data_parallel_sharding`` above ``"none"`` each replica holds, of every optimizer state (and at ``"full"``
of every parameter), only the elements that fall in its flat shard: a contiguous run of the flattened tensor.
Gathering whole tensors to save them would undo the sharding; instead each rank writes its run as the rectangular
pieces of the full tensor it covers (:func:`flat_range_pieces`), with DCP, under the same keys a replicated run
writes (``model/<name>``, ``optim/<i>/<name>/<state>``). DCP then reads any other layout's pieces: a checkpoint
saved at one sharding level and dp size loads at any other, and in one process. Composes with tensor parallelism:
a run of a tensor-parallel slice is mapped to the full tensor through its ``ShardSpec``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.checkpoint.distributed import MODEL, Shards, check_same_groups
from lightning_mp.pipeline.sharding import DataParallelSharding
from lightning_mp.plan.stage_plan import is_placeholder

Piece = tuple[list[int], list[int]]  # (offsets, sizes)


def flat_range_pieces(shape: list[int] | torch.Size, start: int, end: int) -> list[Piece]:
    """Rectangular pieces covering elements ``[start, end)`` of a tensor of ``shape`` flattened in C order; each
    piece is itself a contiguous run of the flat order, and they come in that order."""
    shape = list(shape)
    if start >= end:
        return []
    if len(shape) <= 1:
        return [([start], [end - start])] if shape else [([], [])]
    inner = 1
    for size in shape[1:]:
        inner *= size
    row0, rem0 = divmod(start, inner)
    row1, rem1 = divmod(end, inner)
    if row0 == row1:
        return [([row0, *o], [1, *s]) for o, s in flat_range_pieces(shape[1:], rem0, rem1)]
    pieces: list[Piece] = []
    if rem0:
        pieces += [([row0, *o], [1, *s]) for o, s in flat_range_pieces(shape[1:], rem0, inner)]
        row0 += 1
    if row1 > row0:
        pieces.append(([row0] + [0] * (len(shape) - 1), [row1 - row0, *shape[1:]]))
    if rem1:
        pieces += [([row1, *o], [1, *s]) for o, s in flat_range_pieces(shape[1:], 0, rem1)]
    return pieces


class DataParallelShards:
    """Checkpoint entries of a sharded stage as DCP pieces and back (the same interface as ``Shards``, which it
    falls back to for tensor-parallel entries that are not flat-sharded).

    Args:
        sharding: the stage's data-parallel sharding.
        tp: the tensor-parallel ``Shards`` of the stage, or None.
    """

    def __init__(self, sharding: DataParallelSharding, tp: Shards | None) -> None:
        self.sharding, self.tp = sharding, tp
        self.params = {name: (p, bucket, i) for name, p, _, _, bucket, i in sharding.named_parameter_ranges()}
        self.dp_ranks = dist.get_process_group_ranks(sharding.group)
        self.tp_rank = tp.group_ranks.index(dist.get_rank()) if tp is not None else 0

    # ---- which entries are flat runs ------------------------------------------------------------------------------
    def _param_of(self, key: str) -> tuple[str, bool] | None:
        """(parameter name, is a model entry) of a sharded parameter's entry, else None."""
        if key.startswith(MODEL):
            name = self.sharding.aliases.get(key[len(MODEL) :], "")
            return (name, True) if self.sharding.level == "full" and name in self.params else None
        if key.startswith("optim/") and self.sharding.level != "none":
            name = key.split("/", 2)[2].rpartition("/")[0]
            return (name, False) if name in self.params else None
        return None

    def _range(self, name: str, dp_rank: int) -> tuple[int, int]:
        _, bucket, i = self.params[name]
        return bucket.param_range(i, dp_rank, self.sharding.world)

    def _spec(self, name: str) -> Any:
        return self.tp.specs.get(name) if self.tp is not None else None

    def _full_shape(self, name: str) -> torch.Size:
        p = self.params[name][0]
        local = self.sharding.full_shape(p)
        spec = self._spec(name)
        return spec.full_shape(local) if spec is not None else local

    def is_flat(self, key: str, local: Tensor) -> bool:
        """Whether ``local`` (a save's entry) is this rank's run of a sharded tensor."""
        found = self._param_of(key)
        if found is None:
            return False
        a, b = self._range(found[0], self.sharding.rank)
        return local.dim() == 1 and local.numel() == b - a and len(self._full_shape(found[0])) > 0

    # ---- the Shards interface -----------------------------------------------------------------------------------
    def to_sharded(self, key: str, local: Tensor) -> Tensor:
        """``local`` as the pieces of the full tensor (a ShardedTensor) when it is a flat run; otherwise the
        tensor-parallel conversion (or ``local`` itself)."""
        if not self.is_flat(key, local):
            return self.tp.to_sharded(key, local) if self.tp is not None else local
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

        name = self._param_of(key)[0]  # type: ignore[index]
        spec, device = self._spec(name), local.device
        tp_ranks = range(len(self.tp.group_ranks)) if spec is not None else [self.tp_rank]  # type: ignore[union-attr]
        every = []
        for d, dp_global in enumerate(self.dp_ranks):
            for t in tp_ranks:
                placement = f"rank:{dp_global + t - self.tp_rank}/{device}"
                every += [ShardMetadata(o, s, placement) for o, s, _ in self._pieces(name, d, t, None)]
        back, mine = [], []
        for offsets, sizes, view in self._pieces(name, self.sharding.rank, self.tp_rank, local):
            piece = view.contiguous()
            back.append((view, piece))
            mine.append(Shard(piece, ShardMetadata(offsets, sizes, f"rank:{dist.get_rank()}/{device}")))
        props = TensorProperties.create_from_tensor(local)
        metadata = ShardedTensorMetadata(every, self._full_shape(name), props)
        sharded = ShardedTensor._init_from_local_shards_and_global_metadata(mine, metadata)
        sharded._lmp_local = local, back  # type: ignore[attr-defined]
        return sharded

    def local_empty(self, key: str, full: Tensor) -> Tensor:
        """An empty tensor of this rank's run of ``full`` (the saved full shape) when the entry is flat-sharded
        here; otherwise the tensor-parallel part (or ``full``)."""
        found = self._param_of(key)
        if found is not None and full.dim() > 0 and full.shape == self._full_shape(found[0]):
            a, b = self._range(found[0], self.sharding.rank)
            return torch.empty(b - a, dtype=full.dtype, device=full.device)
        return self.tp.local_empty(key, full) if self.tp is not None else full

    @staticmethod
    def to_local(value: Tensor) -> Tensor:
        return Shards.to_local(value)

    # ---- pieces -------------------------------------------------------------------------------------------------
    def _pieces(self, name: str, dp_rank: int, tp_rank: int, local: Tensor | None) -> list[tuple[list, list, Any]]:
        """(offsets, sizes in the full tensor, view of ``local`` or None) of replica ``dp_rank``'s run of ``name`` on
        tp rank ``tp_rank``."""
        a, b = self._range(name, dp_rank)
        shape = list(self.sharding.full_shape(self.params[name][0]))
        spec = self._spec(name)
        out, at = [], 0
        for offsets, sizes in flat_range_pieces(shape, a, b):
            n = 1
            for s in sizes:
                n *= s
            view = local[at : at + n].view(sizes) if local is not None else None
            at += n
            if spec is None:
                out.append((offsets, sizes, view))
                continue
            out += _to_full(offsets, sizes, view, dataclasses.replace(spec, rank=tp_rank))
        return out


def _to_full(offsets: list[int], sizes: list[int], view: Tensor | None, spec: Any) -> list[tuple[list, list, Any]]:
    """A piece in a tensor-parallel slice's coordinates as pieces of the full tensor (split where fused parts meet)."""
    d, out, local_at = spec.dim, [], 0
    lo, hi = offsets[d], offsets[d] + sizes[d]
    for full_offset, length in spec.slices():
        a, b = max(lo, local_at), min(hi, local_at + length)
        if a < b:
            o, s = list(offsets), list(sizes)
            o[d], s[d] = full_offset + a - local_at, b - a
            out.append((o, s, view.narrow(d, a - lo, b - a) if view is not None else None))
        local_at += length
    return out


# ---- state of a sharded stage, in the model's names -----------------------------------------------------------------


def sharded_state_dict(module: nn.Module, sharding: DataParallelSharding, skip: set[int]) -> dict[str, Any]:
    """The stage's model state; at ``"full"`` each sharded parameter as this rank's flat run (1-D). Parameters in
    ``skip`` (ids: a tied copy, a replica on another tp rank) are left to the rank that writes them: their runs
    there may cut the tensor elsewhere, and DCP refuses overlapping pieces."""
    state = {k: v for k, v in module.state_dict().items() if not is_placeholder(k)}
    if sharding.level == "full":
        runs = {name: (p, bucket, i) for name, p, _, _, bucket, i in sharding.named_parameter_ranges()}
        for key in list(state):
            if key not in sharding.aliases:
                continue
            p, bucket, i = runs[sharding.aliases[key]]
            state[key] = sharding.shard_piece(bucket, i, sharding.shards[bucket.index].detach())
            if id(p) in skip:
                del state[key]
    return state


def sharded_optimizer_state(optimizer: Optimizer, sharding: DataParallelSharding, skip: set[int]) -> dict[str, Any]:
    """The optimizer state of this rank's shards, keyed by parameter name: each element-wise state as the
    parameter's flat run on this rank (1-D), each scalar state (Adam's ``step``) as it is; ``skip`` as in
    :func:`sharded_state_dict`."""
    state: dict[str, dict[str, Any]] = {}
    for name, p, _, _, bucket, i in sharding.named_parameter_ranges():
        if id(p) in skip:
            continue
        shard = sharding.shards[bucket.index]
        for key, value in optimizer.state.get(shard, {}).items():
            element_wise = isinstance(value, Tensor) and value.shape == shard.shape and value.dim() > 0
            state.setdefault(name, {})[key] = sharding.shard_piece(bucket, i, value) if element_wise else value
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": list(names)}
        for group, names in zip(optimizer.param_groups, sharding.group_names)
    ]
    return {"state": state, "param_groups": groups}


def load_sharded_model_state(module: nn.Module, state: dict[str, Any], sharding: DataParallelSharding) -> None:
    """Load a stage's model state (flat runs or whole tensors) into the shards and the module."""
    rest = dict(state)
    if sharding.level == "full":
        found = {sharding.aliases[k]: rest.pop(k) for k in list(rest) if k in sharding.aliases}
        for name, p, a, b, bucket, i in sharding.named_parameter_ranges():
            if name not in found:
                continue
            value = found[name]
            full = sharding.full_shape(p).numel()
            run = value.reshape(-1)[a:b] if value.numel() == full and value.numel() != b - a else value.reshape(-1)
            sharding.shard_piece(bucket, i, sharding.shards[bucket.index].data).copy_(run)
    local = module.state_dict()
    module.load_state_dict({k: v for k, v in rest.items() if k in local}, strict=False)
    sharding.refresh_shards()


def load_sharded_optimizer_state(optimizer: Optimizer, named: dict[str, Any], sharding: DataParallelSharding) -> None:
    """Load a named optimizer state (flat runs or whole tensors, of any saved layout) into this rank's shards.

    Raises:
        ValueError: the saved optimizer has other parameter groups than this one.
    """
    check_same_groups(optimizer, named)
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for name, p, a, b, bucket, i in sharding.named_parameter_ranges():
        saved = named["state"].get(name)
        if not saved:
            continue
        shard = sharding.shards[bucket.index]
        target = optimizer.state[shard]
        for key, value in saved.items():
            if not isinstance(value, Tensor) or (value.dim() == 0 and len(sharding.full_shape(p)) > 0):
                target[key] = value.clone() if isinstance(value, Tensor) else value
                continue
            if key not in target:
                target[key] = torch.zeros_like(shard.detach())
            full = sharding.full_shape(p).numel()
            run = value.reshape(-1)[a:b] if value.numel() == full and value.numel() != b - a else value.reshape(-1)
            sharding.shard_piece(bucket, i, target[key]).copy_(run)

"""What a tensor-parallel rank holds and how ranks talk: :class:`ShardSpec` (which slice of each fused part a rank
keeps), :class:`TPGroup`, and Megatron's communication operators as autograd functions (copy / reduce / gather over
the hidden dim, scatter / gather / reduce-scatter over the sequence)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

Runs = tuple[tuple[tuple[int, int], ...], ...]  # per rank: the (offset, length) runs of the full tensor it holds
STYLES = ("colwise", "rowwise", "vocab", "head", "replicated_kv", "replicate")


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a full tensor a rank holds: a slice along ``dim`` of each fused part (q, k, v ...).

    Slices follow ``torch.chunk`` (and DTensor ``Shard``): a part of ``n`` rows gives each rank ``ceil(n / size)``
    rows, the last ranks fewer when ``n`` does not divide. A projection whose outputs the model cuts in its own way
    (q, k and v interleaved per head, grouped per query group) gives each rank explicit ``runs`` instead, found by
    following its data flow (``tensor.flow``).
    """

    dim: int
    parts: tuple[int, ...]  # sizes along ``dim`` of the fused parts of the full tensor; one part when not fused
    rank: int
    size: int
    runs: Runs | None = None  # per rank, its (offset, length) runs of the full tensor, in order; else by ``parts``

    @property
    def full_size(self) -> int:
        return sum(self.parts)

    def slices(self) -> list[tuple[int, int]]:
        """(offset in the full tensor, length) of this rank's slice of each part (or each of its runs)."""
        if self.runs is not None:
            return list(self.runs[self.rank])
        out, offset = [], 0
        for n in self.parts:
            chunk = -(-n // self.size)
            start = min(self.rank * chunk, n)
            out.append((offset + start, min(start + chunk, n) - start))
            offset += n
        return out

    @property
    def local_size(self) -> int:
        return sum(length for _, length in self.slices())

    def shard(self, full: Tensor) -> Tensor:
        """This rank's shard of ``full``."""
        pieces = [full.narrow(self.dim, offset, length) for offset, length in self.slices()]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)).clone()

    def full_shape(self, local: torch.Size) -> torch.Size:
        shape = list(local)
        shape[self.dim] = self.full_size
        return torch.Size(shape)


@dataclass
class TPGroup:
    """The tensor-parallel group a layer communicates over."""

    group: dist.ProcessGroup
    rank: int
    size: int


# ---- communication with gradients (Megatron's f and g operators, and the gathers) ---------------------------------


class _CopyToTP(torch.autograd.Function):
    """Forward: the replicated input as is. Backward: the sum of the ranks' partial input gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.tp.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: the sum of the ranks' partial outputs. Backward: the gradient as is (every rank needs all of it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=tp.group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: the ranks' slices along the last dim, concatenated. Backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup, spec: ShardSpec) -> Tensor:
        ctx.spec = spec
        return gather_last_dim(x, tp, spec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return dataclasses.replace(ctx.spec, dim=grad.dim() - 1).shard(grad), None, None


def gather_last_dim(x: Tensor, tp: TPGroup, spec: ShardSpec) -> Tensor:
    """The full tensor from each rank's slices (``spec``) along the last dim (uneven slices are padded to send)."""
    layouts = [dataclasses.replace(spec, rank=r).slices() for r in range(spec.size)]
    widest = max(sum(length for _, length in runs) for runs in layouts)
    x = x.contiguous()
    if x.shape[-1] < widest:
        x = F.pad(x, (0, widest - x.shape[-1]))
    pieces = [torch.empty_like(x) for _ in range(spec.size)]
    dist.all_gather(pieces, x, group=tp.group)
    placed: list[tuple[int, Tensor]] = []  # (offset in the full tensor, the piece of it)
    for piece, runs in zip(pieces, layouts):
        local = 0
        for offset, length in runs:
            placed.append((offset, piece[..., local : local + length]))
            local += length
    return torch.cat([t for _, t in sorted(placed, key=lambda p: p[0])], dim=-1)


# ---- sequence parallelism: activations split along the sequence (dim 1) between the tensor-parallel regions ------

SEQ_DIM = 1  # batch-first models: (batch, sequence, features)


def _seq_chunk(x: Tensor, tp: TPGroup) -> Tensor:
    n = x.shape[SEQ_DIM]
    if n % tp.size:
        raise ValueError(
            f"sequence_parallel=True splits the sequence over tensor_parallel_size={tp.size} ranks, but this batch's"
            f" sequence length is {n}: pad sequences to a multiple of {tp.size}, or set sequence_parallel=False."
        )
    return x.narrow(SEQ_DIM, tp.rank * (n // tp.size), n // tp.size)


def _seq_all_gather(x: Tensor, tp: TPGroup) -> Tensor:
    moved = x.movedim(SEQ_DIM, 0).contiguous()
    out = torch.empty((moved.shape[0] * tp.size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, moved, group=tp.group)
    return out.movedim(0, SEQ_DIM)


def _seq_reduce_scatter(x: Tensor, tp: TPGroup) -> Tensor:
    _seq_chunk(x, tp)  # checks the length divides
    moved = x.movedim(SEQ_DIM, 0).contiguous()
    out = torch.empty((moved.shape[0] // tp.size, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, moved, group=tp.group)
    return out.movedim(0, SEQ_DIM)


class _ScatterSeq(torch.autograd.Function):
    """Forward: this rank's slice of the sequence. Backward: the slices' gradients gathered."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return _seq_chunk(x, tp).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _seq_all_gather(grad, ctx.tp), None


class _GatherSeq(torch.autograd.Function):
    """Forward: the whole sequence from the ranks' slices. Backward: this rank's slice of the gradient, summed over
    the ranks when ``summed`` (the ranks' column-parallel layers each contributed a part), else as it is (every
    rank holds the whole gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup, summed: bool) -> Tensor:
        ctx.tp, ctx.summed = tp, summed
        return _seq_all_gather(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.summed:
            return _seq_reduce_scatter(grad, ctx.tp), None, None
        return _seq_chunk(grad, ctx.tp).contiguous(), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """Forward: the ranks' partial outputs summed, each rank keeping its slice of the sequence. Backward: gathered."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tp: TPGroup) -> Tensor:
        ctx.tp = tp
        return _seq_reduce_scatter(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _seq_all_gather(grad, ctx.tp), None


def _map_hidden(args: tuple, kwargs: dict, fn: Any) -> tuple[tuple, dict]:
    """Apply ``fn`` to a module call's hidden states: the first positional tensor, or the ``hidden_states`` kwarg."""
    if args and isinstance(args[0], Tensor):
        return (fn(args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise ValueError(
        "sequence_parallel=True: found no hidden states (a first positional tensor or a hidden_states= argument)"
        " in a call of a tensor-parallel module; set sequence_parallel=False for this model."
    )


def install_sequence_parallel(blocks: list[nn.Module], sublayers: list[nn.Module], tp: TPGroup) -> None:
    """Split the activations along the sequence inside each block: scattered at the block's input, gathered again at
    its output, and gathered whole at the input of each ``sublayer`` (the modules holding column-parallel layers),
    whose row-parallel layers reduce-scatter instead of all-reducing."""
    for block in blocks:
        block.register_forward_pre_hook(
            lambda m, a, k: _map_hidden(a, k, lambda x: _ScatterSeq.apply(x, tp)), with_kwargs=True
        )

        def gather_output(module: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            if isinstance(out, Tensor):
                return _GatherSeq.apply(out, tp, False)
            if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
                return (_GatherSeq.apply(out[0], tp, False), *out[1:])
            raise ValueError(
                f"sequence_parallel=True: {type(module).__name__} returned a {type(out).__name__}, not a tensor (or a"
                " tuple starting with one); set sequence_parallel=False for this model."
            )

        block.register_forward_hook(gather_output, with_kwargs=True)
        for sub in block.modules():
            if getattr(type(sub), "_lmp_style", None) in ("colwise", "rowwise", "replicated_kv"):
                sub._lmp_sp = True  # type: ignore[assignment]
    for sublayer in sublayers:
        sublayer.register_forward_pre_hook(
            lambda m, a, k: _map_hidden(a, k, lambda x: _GatherSeq.apply(x, tp, True)), with_kwargs=True
        )


def gather_full(local: Tensor, tp: TPGroup, spec: ShardSpec) -> Tensor:
    """The full tensor of which every rank of ``tp`` holds the part ``spec`` says (a collective of the group)."""
    return gather_last_dim(local.movedim(spec.dim, -1), tp, spec).movedim(-1, spec.dim).contiguous()


def gather_logits(local: Tensor, tp: TPGroup, spec: ShardSpec) -> Tensor:
    """The full last dim from the ranks' slices, differentiably (the gradient keeps this rank's slice)."""
    return _GatherFromTP.apply(local, tp, spec)


def copy_to_tp(x: Tensor, tp: TPGroup) -> Tensor:
    return _CopyToTP.apply(x, tp)


def reduce_from_tp(x: Tensor, tp: TPGroup) -> Tensor:
    return _ReduceFromTP.apply(x, tp)


def reduce_scatter_seq(x: Tensor, tp: TPGroup) -> Tensor:
    """Sum partial products over the ranks, each keeping its slice of the sequence (sequence parallelism)."""
    return _ReduceScatterSeq.apply(x, tp)

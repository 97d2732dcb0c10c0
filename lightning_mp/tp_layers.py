"""Tensor-parallel layers: a module's weights split across the ranks of a tensor-parallel group.

Megatron's scheme, applied to the user's own modules in place. A *column-parallel* linear layer holds a slice of the
output features (each rank computes some heads, or some MLP neurons); the *row-parallel* layer after it holds the
matching slice of its input features, and one all-reduce of its partial products restores the full output. A
*vocabulary-parallel* embedding holds a slice of the vocabulary; the LM head, column-parallel over the vocabulary,
hands the loss either gathered logits or, under ``loss_parallel``, a DTensor sharded over the vocabulary, so that
PyTorch's vocabulary-parallel cross-entropy never gathers them.

Parameters stay plain tensors holding this rank's shard (their :class:`ShardSpec` says which part of the full tensor
it is): the optimizer, gradient clipping, data-parallel averaging and the pipeline's own machinery see ordinary
tensors, and no per-operation DTensor dispatch runs inside the layers. DTensor appears only where PyTorch's own code
does the work: the sharded logits for the loss, and checkpoints (see :mod:`lightning_mp.checkpoint`).

A layer becomes parallel by swapping its class for a subclass of the same name (``isinstance`` still holds) whose
``forward`` computes on the shard and communicates over the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

STYLES = ("colwise", "rowwise", "vocab", "head", "replicated_kv", "replicate")


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a full tensor a rank holds: a slice along ``dim`` of each fused part (q, k, v ...).

    Slices follow ``torch.chunk`` (and DTensor ``Shard``): a part of ``n`` rows gives each rank ``ceil(n / size)``
    rows, the last ranks fewer when ``n`` does not divide.
    """

    dim: int
    parts: tuple[int, ...]  # sizes along ``dim`` of the fused parts of the full tensor; one part when not fused
    rank: int
    size: int

    @property
    def full_size(self) -> int:
        return sum(self.parts)

    def slices(self) -> list[tuple[int, int]]:
        """(offset in the full tensor, length) of this rank's slice of each part."""
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
        spec = ShardSpec(grad.dim() - 1, ctx.spec.parts, ctx.spec.rank, ctx.spec.size)
        return spec.shard(grad), None, None


def gather_last_dim(x: Tensor, tp: TPGroup, spec: ShardSpec) -> Tensor:
    """The full tensor from each rank's slice (``spec``) along the last dim (uneven slices are padded to send)."""
    widths = [ShardSpec(0, spec.parts, r, spec.size).local_size for r in range(spec.size)]
    widest = max(widths)
    x = x.contiguous()
    if x.shape[-1] < widest:
        x = F.pad(x, (0, widest - x.shape[-1]))
    pieces = [torch.empty_like(x) for _ in range(spec.size)]
    dist.all_gather(pieces, x, group=tp.group)
    slices = [[] for _ in spec.parts]  # part -> the ranks' slices, in rank order
    for r, (piece, width) in enumerate(zip(pieces, widths)):
        local = 0
        for i, (_, length) in enumerate(ShardSpec(0, spec.parts, r, spec.size).slices()):
            slices[i].append(piece[..., local : local + length])
            local += length
        assert local == width
    return torch.cat([s for part in slices for s in part], dim=-1)


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


# ---- the parallel layers ------------------------------------------------------------------------------------------


def _tp_of(module: nn.Module) -> TPGroup:
    return module._lmp_tp  # type: ignore[no-any-return]


def _enter(module: nn.Module, x: Tensor) -> Tensor:
    """A column-parallel layer's input: replicated (its gradient summed over the ranks), or under sequence
    parallelism already gathered by the enclosing module (whose gather sums the gradient)."""
    return x if getattr(module, "_lmp_sp", False) else copy_to_tp(x, _tp_of(module))


def _leave(module: nn.Module, y: Tensor) -> Tensor:
    """A row-parallel layer's partial output, summed over the ranks (under sequence parallelism: each rank gets the
    sum for its slice of the sequence)."""
    tp = _tp_of(module)
    return _ReduceScatterSeq.apply(y, tp) if getattr(module, "_lmp_sp", False) else reduce_from_tp(y, tp)


def _linear(module: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """The local product; under zero_bubble its weight gradient is deferred like a plain layer's (weight_grads)."""
    deferred = getattr(module, "_lmp_deferred", None)
    if deferred is not None:
        return deferred.linear(x, module.weight, bias)  # type: ignore[no-any-return]
    return F.linear(x, module.weight, bias)


class _ColwiseLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return _linear(self, _enter(self, x), self.bias)


class _RowwiseLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        y = _leave(self, _linear(self, x, None))
        return y if self.bias is None else y + self.bias


class _VocabEmbedding(nn.Embedding):
    def forward(self, ids: Tensor) -> Tensor:
        start, length = self._lmp_range  # type: ignore[attr-defined]
        outside = (ids < start) | (ids >= start + length)
        local_ids = (ids - start).masked_fill(outside, 0)
        padding = self.padding_idx - start if self.padding_idx is not None else None
        if padding is not None and not 0 <= padding < length:
            padding = None
        out = F.embedding(local_ids, self.weight, padding, None, 2.0, self.scale_grad_by_freq, self.sparse)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, _tp_of(self))


class _VocabHead(nn.Linear):
    """Column-parallel over the vocabulary; under ``vocab_loss.loss_parallel`` the logits stay split (see there),
    otherwise they are gathered."""

    def forward(self, x: Tensor) -> Tensor:
        from lightning_mp.vocab_loss import ShardedLogits, loss_parallel_active

        tp = _tp_of(self)
        local = _linear(self, copy_to_tp(x, tp), self.bias)
        spec: ShardSpec = self._lmp_out_spec  # type: ignore[attr-defined]
        if loss_parallel_active():
            return ShardedLogits(local, tp, spec)
        return gather_logits(local, tp, spec)


def _conv1d_class() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _conv1d_forward(module: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    shape = (*x.shape[:-1], module.weight.shape[1])
    flat = x.reshape(-1, x.shape[-1])
    out = flat.mm(module.weight) if bias is None else torch.addmm(bias, flat, module.weight)
    return out.view(shape)


def _colwise_conv1d_forward(self: nn.Module, x: Tensor) -> Tensor:
    return _conv1d_forward(self, _enter(self, x), self.bias)


def _rowwise_conv1d_forward(self: nn.Module, x: Tensor) -> Tensor:
    return _leave(self, _conv1d_forward(self, x, None)) + self.bias


# ---- making a module parallel -------------------------------------------------------------------------------------

_swapped: dict[tuple[type, str], type] = {}


def _swap_forward(module: nn.Module, style: str, forward: Any) -> None:
    cls = type(module)
    key = (cls, style)
    if key not in _swapped:
        _swapped[key] = type(cls.__name__, (cls,), {"forward": forward, "_lmp_style": style})
        _swapped[key].__module__, _swapped[key].__qualname__ = cls.__module__, cls.__qualname__
    module.__class__ = _swapped[key]


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """(output-feature dim, input-feature dim) of a linear-like module's weight."""
    conv1d = _conv1d_class()
    return (1, 0) if conv1d is not None and isinstance(module, conv1d) else (0, 1)


def is_linear_like(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def shard_module(
    module: nn.Module,
    style: str,
    tp: TPGroup,
    parts: tuple[int, ...] | None = None,
    already: dict[int, ShardSpec] | None = None,
) -> dict[str, ShardSpec]:
    """Make ``module`` tensor-parallel in ``style``; returns the specs of the parameters it now holds in part.

    Args:
        module: an ``nn.Linear`` (or Hugging Face ``Conv1D``) for "colwise" / "rowwise" / "head", an ``nn.Embedding``
            for "vocab".
        style: "colwise" (output features split), "rowwise" (input features split), "vocab" (an embedding's rows),
            "head" (an LM head, colwise over the vocabulary), "replicated_kv" (whole key/value projections of
            grouped-query attention with fewer heads than ranks: the input gradient is summed like colwise).
        parts: for a fused colwise projection, the sizes of its parts along the output features (q, k, v).
        already: parameters split before (by id), such as an embedding's weight tied to this head: not split again.

    Raises:
        ValueError: a tied parameter already split along another dim, or an unknown style.
    """
    conv1d = _conv1d_class()
    is_conv1d = conv1d is not None and isinstance(module, conv1d)
    specs: dict[str, ShardSpec] = {}

    def split(name: str, dim: int, parts_: tuple[int, ...] | None = None) -> None:
        param = getattr(module, name)
        known = (already or {}).get(id(param))
        if known is not None:
            if known.dim != dim:
                raise ValueError(f"its {name} is shared with a layer split along dim {known.dim}, not {dim}")
            specs[name] = known
            return
        spec = ShardSpec(dim, parts_ or (param.shape[dim],), tp.rank, tp.size)
        with torch.no_grad():
            param.data = spec.shard(param.data)
        specs[name] = spec

    module._lmp_tp = tp  # type: ignore[assignment]
    if style == "vocab":
        split("weight", 0)
        module._lmp_range = (specs["weight"].slices()[0][0], specs["weight"].local_size)  # type: ignore[assignment]
        _swap_forward(module, style, _VocabEmbedding.forward)
        return specs
    out_dim, in_dim = weight_dims(module)
    if style in ("colwise", "head"):
        split("weight", out_dim, parts)
        if module.bias is not None:
            split("bias", 0, parts)
        if style == "head":
            module._lmp_out_spec = specs["weight"]  # type: ignore[assignment]
            _swap_forward(module, style, _VocabHead.forward)
        else:
            _swap_forward(module, style, _colwise_conv1d_forward if is_conv1d else _ColwiseLinear.forward)
    elif style == "replicated_kv":  # whole weights on every rank; each rank's gradient is its heads' part
        _swap_forward(module, style, _colwise_conv1d_forward if is_conv1d else _ColwiseLinear.forward)
    elif style == "rowwise":
        split("weight", in_dim)
        _swap_forward(module, style, _rowwise_conv1d_forward if is_conv1d else _RowwiseLinear.forward)
    else:
        raise ValueError(f"unknown tensor-parallel style {style!r}: use one of {', '.join(STYLES)}")
    return specs

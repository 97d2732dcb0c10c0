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
does the work: the sharded logits for the loss, and checkpoints (see :mod:`lightning_mp.checkpoint.distributed`).

A layer becomes parallel by swapping its class for a subclass of the same name (``isinstance`` still holds) whose
``forward`` computes on the shard and communicates over the group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_mp.tensor.shard import (
    STYLES,
    Runs,
    ShardSpec,
    TPGroup,
    copy_to_tp,
    gather_logits,
    reduce_from_tp,
    reduce_scatter_seq,
)
from lightning_mp.tensor.vocab_loss import ShardedLogits, loss_parallel_active

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
    return reduce_scatter_seq(y, tp) if getattr(module, "_lmp_sp", False) else reduce_from_tp(y, tp)


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
    """Placed under the embedding's own class in the method order (see :func:`_swap_vocab`): a subclass's forward
    that adds work around ``super().forward`` (Gemma's scaling) keeps it, and its ``super().forward`` lands here."""

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


def _swap_vocab(module: nn.Module) -> None:
    """Make an embedding vocabulary-parallel, keeping what its class's own forward adds."""
    cls = type(module)
    key = (cls, "vocab")
    if key not in _swapped:
        bases = (_VocabEmbedding,) if cls is nn.Embedding else (cls, _VocabEmbedding)
        _swapped[key] = type(cls.__name__, bases, {"_lmp_style": "vocab"})
        _swapped[key].__module__, _swapped[key].__qualname__ = cls.__module__, cls.__qualname__
    module.__class__ = _swapped[key]


def _plain_linear_like(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def lora_parts(module: nn.Module) -> tuple[nn.Module, nn.ModuleDict, nn.ModuleDict] | None:
    """(base layer, A per adapter, B per adapter) of a LoRA-wrapped linear layer (PEFT's ``lora.Linear``: its
    output is ``base_layer(x) + lora_B(lora_A(x)) * scaling``), else None."""
    base = getattr(module, "base_layer", None)
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if base is None or not _plain_linear_like(base) or not isinstance(a, nn.ModuleDict):
        return None
    return (base, a, b) if isinstance(b, nn.ModuleDict) else None


def weight_dims(module: nn.Module) -> tuple[int, int]:
    """(output-feature dim, input-feature dim) of a linear-like module's weight."""
    wrapped = lora_parts(module)
    if wrapped is not None:
        return weight_dims(wrapped[0])
    conv1d = _conv1d_class()
    return (1, 0) if conv1d is not None and isinstance(module, conv1d) else (0, 1)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, a Hugging Face ``Conv1D``, or a LoRA wrapper around one (split like its base layer)."""
    return _plain_linear_like(module) or lora_parts(module) is not None


# a LoRA wrapper's style -> the style of its A and B layers: B follows a column-parallel base (its outputs are the
# base's), A a row-parallel one (its inputs are the base's, its small output summed over the ranks); the other is
# whole. Beside whole key/value projections, A takes the input like them (its input gradient summed).
_LORA_STYLES = {"colwise": (None, "colwise"), "rowwise": ("rowwise", None), "replicated_kv": ("replicated_kv", None)}


def _shard_lora(
    module: nn.Module, style: str, tp: TPGroup, parts: tuple[int, ...] | None, already: dict[int, ShardSpec] | None,
    runs: Runs | None = None,
) -> dict[str, ShardSpec]:  # fmt: skip
    """Split a LoRA-wrapped layer consistently with its base layer; its own forward runs unchanged."""
    if style not in _LORA_STYLES:
        raise ValueError(f"a LoRA-wrapped layer cannot be split {style!r}: use colwise, rowwise or replicate")
    base, lora_a, lora_b = lora_parts(module)  # type: ignore[misc]
    specs = {f"base_layer.{n}": s for n, s in shard_module(base, style, tp, parts, already, runs).items()}
    a_style, b_style = _LORA_STYLES[style]
    for prefix, layers, layer_style in (("lora_A", lora_a, a_style), ("lora_B", lora_b, b_style)):
        for key, layer in layers.items():
            if layer_style is not None:
                column = layer_style == "colwise"
                found = shard_module(
                    layer, layer_style, tp, parts if column else None, already, runs if column else None
                )
                specs.update({f"{prefix}.{key}.{n}": s for n, s in found.items()})
    module._lmp_tp = tp  # type: ignore[assignment]
    return specs


def shard_module(
    module: nn.Module,
    style: str,
    tp: TPGroup,
    parts: tuple[int, ...] | None = None,
    already: dict[int, ShardSpec] | None = None,
    runs: Runs | None = None,
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
        runs: for a colwise projection whose outputs the model cuts in its own way, each rank's (offset, length)
            runs of the output features (found by ``tensor.flow``); overrides ``parts``.

    Raises:
        ValueError: a tied parameter already split along another dim, or an unknown style.
    """
    if lora_parts(module) is not None:
        return _shard_lora(module, style, tp, parts, already, runs)
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
        spec = ShardSpec(dim, parts_ or (param.shape[dim],), tp.rank, tp.size, runs if parts_ is not None else None)
        with torch.no_grad():
            param.data = spec.shard(param.data)
        specs[name] = spec

    module._lmp_tp = tp  # type: ignore[assignment]
    if style == "vocab":
        split("weight", 0)
        module._lmp_range = (specs["weight"].slices()[0][0], specs["weight"].local_size)  # type: ignore[assignment]
        _swap_vocab(module)
        return specs
    out_dim, in_dim = weight_dims(module)
    if style in ("colwise", "head"):
        out_parts = (module.weight.shape[out_dim],) if runs is not None else parts
        split("weight", out_dim, out_parts)
        if module.bias is not None:
            split("bias", 0, out_parts)
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

"""Splitting a batch, whatever its structure, into micro-batches along the sample dimension."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_mp.runtime.tree import rebuild_mapping, tree_leaves, tree_map


def batch_size_of(batch: Any) -> int | None:
    """Number of samples: the first dimension of the first tensor (of at least one dimension) in ``batch``."""
    sized = [t for t in tree_leaves(batch) if t.dim() > 0]
    return sized[0].shape[0] if sized else None


def split_batch(batch: Any, num_microbatches: int) -> tuple[list[Any], list[int]]:
    """Split ``batch`` into at most ``num_microbatches`` micro-batches and return them with their sizes.

    Tensors whose first dimension is the batch size are split along it (sizes differ by at most one, so a batch
    that ``num_microbatches`` does not divide, or a short last batch, still splits); lists and tuples of strings
    of that length are split the same way; everything else (scalars, tensors of other shapes, None) is given to
    every micro-batch. A batch smaller than ``num_microbatches`` gives one micro-batch per sample.
    """
    size = batch_size_of(batch)
    if size is None or num_microbatches <= 1 or size <= 1:
        return [batch], [size or 1]
    chunks = min(num_microbatches, size)
    index_chunks = torch.arange(size).tensor_split(chunks)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in index_chunks]
    return [_slice(batch, start, end, size) for start, end in bounds], [end - start for start, end in bounds]


def _slice(obj: Any, start: int, end: int, size: int) -> Any:
    def is_leaf(x: Any) -> bool:
        return isinstance(x, Tensor) or _is_text_column(x, size)

    def cut(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x[start:end] if x.dim() > 0 and x.shape[0] == size else x
        return type(x)(x[start:end])

    return tree_map(cut, obj, is_leaf)


def _is_text_column(obj: Any, size: int) -> bool:
    """A list or tuple of ``size`` strings: one per sample, split like a tensor."""
    return isinstance(obj, (list, tuple)) and len(obj) == size and bool(obj) and all(isinstance(x, str) for x in obj)


def concat_microbatches(outputs: list[Any]) -> Any:
    """Inverse of :func:`split_batch` for step outputs: tensors concatenated along dim 0, structures rebuilt.

    Scalars (0-dim tensors, numbers, strings) cannot be concatenated: the list of them is returned.
    """
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, Tensor) and first.dim() > 0:
        return torch.cat(outputs)
    if isinstance(first, Mapping):
        return rebuild_mapping(first, {k: concat_microbatches([o[k] for o in outputs]) for k in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat_microbatches(list(v)) for v in zip(*outputs)))
    if isinstance(first, (list, tuple)) and all(isinstance(o, type(first)) and len(o) == len(first) for o in outputs):
        if first and all(isinstance(x, (Tensor, Mapping, list, tuple)) for x in first):
            return type(first)(concat_microbatches(list(v)) for v in zip(*outputs))
        return type(first)(x for o in outputs for x in o)
    return outputs


def check_microbatches(batch: Any, microbatches: int | str) -> None:
    """An explicit ``microbatches`` above the (first, full) batch size is a configuration error; a short last batch
    later just gets fewer micro-batches.

    Raises:
        ValueError: naming the batch size and the fix.
    """
    size = batch_size_of(batch)
    if isinstance(microbatches, int) and size is not None and size < microbatches:
        raise ValueError(
            f"microbatches={microbatches} is larger than the batch of {size} samples: each micro-batch needs at least"
            f" one sample. Use microbatches<={size} (or 'auto'), or a batch size of at least {microbatches}."
        )

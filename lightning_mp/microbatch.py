"""Splitting a batch, whatever its structure, into micro-batches along the sample dimension."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def batch_size_of(batch: Any) -> int | None:
    """Number of samples: the first dimension of the first tensor (of at least one dimension) in ``batch``."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    for child in _children(batch):
        size = batch_size_of(child)
        if size is not None:
            return size
    return None


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
    if isinstance(obj, Tensor):
        return obj[start:end] if obj.dim() > 0 and obj.shape[0] == size else obj
    if isinstance(obj, (list, tuple)) and len(obj) == size and obj and all(isinstance(x, str) for x in obj):
        return type(obj)(obj[start:end])
    if isinstance(obj, Mapping):
        return _rebuild_mapping(obj, {k: _slice(v, start, end, size) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_slice(v, start, end, size) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(v, start, end, size) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _slice(getattr(obj, f.name), start, end, size) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def _rebuild_mapping(original: Mapping, items: dict) -> Mapping:
    """A mapping of the original's type where its constructor takes a dict (dict, OrderedDict, BatchEncoding)."""
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except TypeError:
        return items


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return list(obj.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return []


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
        return _rebuild_mapping(first, {k: concat_microbatches([o[k] for o in outputs]) for k in first})
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat_microbatches(list(v)) for v in zip(*outputs)))
    if isinstance(first, (list, tuple)) and all(isinstance(o, type(first)) and len(o) == len(first) for o in outputs):
        if first and all(isinstance(x, (Tensor, Mapping, list, tuple)) for x in first):
            return type(first)(concat_microbatches(list(v)) for v in zip(*outputs))
        return type(first)(x for o in outputs for x in o)
    return outputs

"""Nested batches and step outputs (tensors inside tuples, lists, dicts, dataclasses, ``BatchEncoding``): the one
walker that micro-batch slicing, message flattening and device moves share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor


def is_tensor(obj: Any) -> bool:
    return isinstance(obj, Tensor)


def tree_map(fn: Callable[[Any], Any], obj: Any, is_leaf: Callable[[Any], bool] = is_tensor) -> Any:
    """``obj`` rebuilt with ``fn`` applied to every leaf (a tensor, unless ``is_leaf`` says otherwise); anything
    that is neither a leaf nor a container is kept as it is."""
    if is_leaf(obj):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        return dataclasses.replace(obj, **{k: tree_map(fn, getattr(obj, k), is_leaf) for k in fields})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(tree_map(fn, v, is_leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v, is_leaf) for v in obj)
    if isinstance(obj, Mapping):
        return rebuild_mapping(obj, {k: tree_map(fn, v, is_leaf) for k, v in obj.items()})
    return obj


def tree_leaves(obj: Any, is_leaf: Callable[[Any], bool] = is_tensor) -> list[Any]:
    """The leaves of ``obj`` in the order :func:`tree_map` visits them."""
    leaves: list[Any] = []
    tree_map(leaves.append, obj, is_leaf)
    return leaves


def rebuild_mapping(original: Mapping, items: dict) -> Mapping:
    """A mapping of the original's type where its constructor takes a dict (dict, OrderedDict, BatchEncoding)."""
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except TypeError:
        return items


Path = tuple[Any, ...]


def tree_map_with_path(fn: Callable[[Path, Any], Any], obj: Any, path: Path = ()) -> Any:
    """As :func:`tree_map` over tensors, ``fn`` also given each leaf's path (indices, keys, field names)."""
    if isinstance(obj, Tensor):
        return fn(path, obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        return dataclasses.replace(obj, **{k: tree_map_with_path(fn, getattr(obj, k), (*path, k)) for k in fields})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_map_with_path(fn, v, (*path, i)) for i, v in enumerate(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map_with_path(fn, v, (*path, i)) for i, v in enumerate(obj))
    if isinstance(obj, Mapping):
        return rebuild_mapping(obj, {k: tree_map_with_path(fn, v, (*path, k)) for k, v in obj.items()})
    return obj


def tensors_with_paths(obj: Any) -> list[tuple[Path, Tensor]]:
    """Every tensor in ``obj`` with its path, in :func:`tree_map_with_path` order."""
    found: list[tuple[Path, Tensor]] = []
    tree_map_with_path(lambda path, t: found.append((path, t)) or t, obj)
    return found

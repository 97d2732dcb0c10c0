"""The one walker over nested batches and outputs."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import torch

from lightning_mp.runtime.tree import tensors_with_paths, tree_leaves, tree_map, tree_map_with_path


@dataclass
class Output:
    logits: torch.Tensor
    extra: tuple


Pair = namedtuple("Pair", ["a", "b"])


def _nested() -> dict:
    return {"x": torch.ones(2), "y": [Pair(torch.zeros(1), "tag"), Output(torch.ones(3), (None, torch.ones(1)))]}


def test_tree_map_rebuilds_every_container_kind() -> None:
    doubled = tree_map(lambda t: t * 2, _nested())
    assert torch.equal(doubled["x"], torch.full((2,), 2.0))
    assert isinstance(doubled["y"][0], Pair) and doubled["y"][0].b == "tag"
    assert isinstance(doubled["y"][1], Output) and torch.equal(doubled["y"][1].logits, torch.full((3,), 2.0))
    assert doubled["y"][1].extra[0] is None
    assert type(tree_map(lambda t: t, OrderedDict(a=torch.ones(1)))) is OrderedDict


def test_paths_name_each_tensor_and_replace_it() -> None:
    nested = _nested()
    paths = [path for path, _ in tensors_with_paths(nested)]
    assert paths == [("x",), ("y", 0, 0), ("y", 1, "logits"), ("y", 1, "extra", 1)]
    replaced = tree_map_with_path(lambda path, t: torch.zeros(5) if path == ("y", 1, "logits") else t, nested)
    assert replaced["y"][1].logits.shape == (5,) and replaced["x"] is nested["x"]
    assert len(tree_leaves(nested)) == 4

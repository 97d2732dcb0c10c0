"""Splitting batches of any structure into micro-batches."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch

from lightning_mp.pipeline.microbatch import batch_size_of, split_batch


def test_dict_batch_uneven_split() -> None:
    batch = {"input_ids": torch.arange(14).view(7, 2), "labels": torch.arange(7), "scale": 2.0}
    mbs, sizes = split_batch(batch, 3)
    assert sizes == [3, 2, 2]
    assert torch.equal(torch.cat([m["input_ids"] for m in mbs]), batch["input_ids"])
    assert all(m["scale"] == 2.0 for m in mbs)


def test_fewer_samples_than_microbatches() -> None:
    mbs, sizes = split_batch((torch.zeros(2, 3), torch.ones(2)), 8)
    assert sizes == [1, 1] and mbs[0][0].shape == (1, 3)


def test_structures_are_kept() -> None:
    Pair = namedtuple("Pair", "x y")

    @dataclass
    class Batch:
        x: torch.Tensor
        names: list

    mbs, _ = split_batch([Pair(torch.zeros(4), torch.zeros(4, 2)), Batch(torch.ones(4), ["a", "b", "c", "d"])], 2)
    assert isinstance(mbs[0][0], Pair) and mbs[0][0].y.shape == (2, 2)
    assert isinstance(mbs[1][1], Batch) and mbs[1][1].names == ["c", "d"]


def test_non_batch_tensors_are_shared() -> None:
    table = torch.zeros(5, 5)
    mbs, _ = split_batch({"x": torch.zeros(4, 1), "table": table}, 2)
    assert all(m["table"] is table for m in mbs)


def test_batch_size_of() -> None:
    assert batch_size_of({"a": 3, "b": (torch.zeros(()), torch.zeros(6, 2))}) == 6
    assert batch_size_of([1, 2]) is None
    assert split_batch("text", 4) == (["text"], [1])

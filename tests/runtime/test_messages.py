"""The structure of stage messages survives flattening (tensors, None, tuples, dicts, dataclasses, namedtuples)."""

from __future__ import annotations

import pickle
from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch

from lightning_mp.runtime.messages import FRAME_BYTES, decode_frames, encode_frames, flatten, frame_overflow, unflatten

Out = namedtuple("Out", "hidden extra")


@dataclass
class BlockOutput:
    hidden: torch.Tensor
    bias: torch.Tensor | None = None


def test_roundtrip_keeps_structure_and_order() -> None:
    a, b, c = torch.ones(2), torch.zeros(3), torch.arange(4)
    value = (a, None, {"k": [b, 3]}, Out(c, "x"), BlockOutput(a), OrderedDict(z=b))
    tensors, spec = flatten(value)
    assert [t.shape for t in tensors] == [a.shape, b.shape, c.shape, a.shape, b.shape]
    rebuilt = unflatten(pickle.loads(pickle.dumps(spec)), tensors)
    assert rebuilt[1] is None and rebuilt[2]["k"][1] == 3
    assert isinstance(rebuilt[3], Out) and rebuilt[3].extra == "x"
    assert isinstance(rebuilt[4], BlockOutput) and rebuilt[4].bias is None
    assert isinstance(rebuilt[5], OrderedDict)


def test_single_tensor() -> None:
    t = torch.randn(2, 2)
    tensors, spec = flatten(t)
    assert unflatten(spec, tensors) is t


def _payload(size: int) -> bytes:
    """``size`` bytes: 0..255 repeated, then zeros to the length."""
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@pytest.mark.parametrize("size", [0, 100, FRAME_BYTES - 8, FRAME_BYTES, 3 * FRAME_BYTES + 5])
def test_frames_carry_any_payload_size(size: int) -> None:
    payload = _payload(size)
    frames = encode_frames(payload, torch.device("cpu"))
    assert frames[0].numel() == FRAME_BYTES
    assert frame_overflow(frames[0]) == (frames[1].numel() if len(frames) > 1 else 0)
    assert decode_frames(frames[0], frames[1] if len(frames) > 1 else None) == payload


def test_objects_land_on_the_receivers_device() -> None:
    from lightning_mp.runtime.messages import dump_object, load_object

    sent = {"loss": torch.tensor(1.5), "logs": [torch.ones(2)], "step": 3}
    got = load_object(dump_object(sent), torch.device("meta"))  # the receiver's device, whatever the sender's
    assert got["loss"].device.type == "meta" and got["logs"][0].device.type == "meta" and got["step"] == 3


@pytest.mark.parametrize("size", [0, FRAME_BYTES - 8, 2 * FRAME_BYTES + 3])
def test_all_gather_bytes_returns_each_payload_whole(size: int) -> None:
    import torch.distributed as dist

    from lightning_mp.runtime.messages import all_gather_bytes

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        payload = _payload(size)
        assert all_gather_bytes(payload, None, torch.device("cpu")) == [payload]
    finally:
        dist.destroy_process_group()


def _gather_mixed_sizes(rank: int, store_path: str) -> None:
    import torch.distributed as dist

    from lightning_mp.runtime.messages import all_gather_bytes

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        sizes = [10, 3 * FRAME_BYTES]  # only rank 1's payload needs a second frame
        got = all_gather_bytes(bytes([rank + 1]) * sizes[rank], None, torch.device("cpu"))
        assert got == [bytes([r + 1]) * sizes[r] for r in range(2)]
    finally:
        dist.destroy_process_group()


def test_all_gather_bytes_across_ranks_when_one_payload_overflows(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_gather_mixed_sizes, args=(str(tmp_path / "store"),), nprocs=2, start_method="spawn")

"""The vocabulary-parallel loss on 2 processes: the loss never gathers the logits; anything else sees them whole."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from lightning_mp.tensor.shard import ShardSpec, TPGroup
from lightning_mp.tensor.vocab_loss import ShardedLogits, loss_parallel

VOCAB = 11  # uneven over 2 ranks: 6 + 5


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    full = torch.randn(2, 5, VOCAB, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (2, 5))
    target[0, 0] = -100  # ignored, as Hugging Face pads labels
    spec = ShardSpec(2, (VOCAB,), rank, 2)
    local = spec.shard(full).requires_grad_()
    with loss_parallel():
        logits = ShardedLogits(local, TPGroup(dist.group.WORLD, rank, 2), spec)
        # what Hugging Face's causal-LM loss does with the logits
        shifted = logits.float()[:, :-1].reshape(-1, VOCAB)
        loss = F.cross_entropy(shifted, target[:, 1:].reshape(-1), ignore_index=-100)
        kept_split = isinstance(shifted, ShardedLogits) and logits._full is None
        loss.backward()
        predictions = logits.argmax(-1)  # anything else sees the whole vocabulary
    reference = full.clone().requires_grad_()
    expected = F.cross_entropy(reference.float()[:, :-1].reshape(-1, VOCAB), target[:, 1:].reshape(-1))
    expected.backward()
    results[rank] = {
        "kept_split": kept_split,
        "plain_loss": type(loss) is torch.Tensor,
        "loss_diff": abs(loss.item() - expected.item()),
        "grad_diff": (local.grad - spec.shard(reference.grad)).abs().max().item(),
        "argmax_ok": torch.equal(predictions, full.argmax(-1)),
    }
    dist.destroy_process_group()


@pytest.mark.distributed
def test_vocabulary_parallel_cross_entropy() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    for rank in range(2):
        r = results[rank]
        assert r["kept_split"] and r["plain_loss"] and r["argmax_ok"]
        assert r["loss_diff"] < 1e-6 and r["grad_diff"] < 1e-6

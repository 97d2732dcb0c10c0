"""Moving a layer's optimizer state between stages (pipeline/rebalance.py), in one process."""

from __future__ import annotations

import torch
from torch import nn

from lightning_mp.pipeline.rebalance import _give_optimizer_state, _take_optimizer_state, stage_of_layers


def test_stage_of_layers() -> None:
    assert stage_of_layers([2, 1, 3]) == [0, 0, 1, 2, 2, 2]


def test_adam_state_moves_with_its_layer_and_its_step_stays_on_the_cpu() -> None:
    """What a stage sends for a layer it gives up (every tensor on the run's device: NCCL sends no CPU tensor) and
    what the taking stage rebuilds: the same state, Adam's CPU ``step`` back on the CPU, in the same group."""
    block = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(block.parameters(), lr=0.1)
    block(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    before = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in block.named_parameters()}
    taken = _take_optimizer_state([optimizer], block, torch.device("cpu"))
    assert not optimizer.state and not optimizer.param_groups[0]["params"]
    assert all("step" in on_cpu for _, _, _, on_cpu in taken.values())  # (here every tensor is on the CPU)
    _give_optimizer_state([optimizer], block, taken)
    for name, param in block.named_parameters():
        state = optimizer.state[param]
        assert state["step"].device.type == "cpu"
        assert all(torch.equal(state[k], v) for k, v in before[name].items())
    assert len(optimizer.param_groups[0]["params"]) == 2

"""What travels between layers besides the activation, observed on one forward (plan/flow.py)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_mp.plan.discovery import discover_layers
from lightning_mp.plan.flow import observe_layer_inputs
from lightning_mp.plan.profiling import observe_call_order
from lightning_mp.plan.stage_plan import StagePlan


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = self.linear(x)
        return y + memory.mean() if memory is not None else y


class EncoderDecoder(nn.Module):
    """Two block lists run one after the other; every decoder block reads the encoder's (normed) output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(4)
        self.decoder = nn.ModuleList(Block() for _ in range(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids > 0  # from the batch alone: every stage computes it itself
        x = self.embed(ids)
        for block in self.encoder:
            x = block(x, mask=mask)
        memory = self.norm(x)
        y = self.embed(ids)
        for block in self.decoder:
            y = block(y, memory, mask)
        return y.sum()


def test_an_encoder_output_read_by_later_blocks_is_carried() -> None:
    model = EncoderDecoder()
    ids = torch.tensor([[1, 2, 0]])
    found = discover_layers(model, call_order=observe_call_order(model, lambda: model(ids)))
    assert found.container_names == ["encoder", "decoder"] and found.positions["norm"] == [2]
    assert sorted(found.positions["embed"]) == [0, 2]  # embedded again for the decoder: kept on both stages
    flow = observe_layer_inputs(model, found, lambda: model(ids))
    memory = next(i for i in flow.inputs[3] if i.path == (0, 1))
    mask = next(i for i in flow.inputs[3] if i.path == (0, 2))
    assert memory.derived and not memory.main and not mask.derived
    found.inputs = flow.inputs
    plan = StagePlan(found, [3, 1])
    (carry,) = plan.carries_into(1)
    assert carry.source == (2, (0, 1)) and carry.consumers == ((3, (0, 1)),)
    assert StagePlan(found, [2, 2]).carries_into(1) == []  # at the boundary, stage 1 computes the memory itself

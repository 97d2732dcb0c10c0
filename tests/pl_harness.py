"""The standalone ``pytorch_lightning`` package: train a small nn.Sequential model with ``strategy="model_parallel"``.

Usage: ``python tests/pl_harness.py OUT_DIR DEVICES``; every rank writes ``OUT_DIR/rank<r>.pt`` (losses, parameters).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mp  # noqa: F401  (registers "model_parallel" in pytorch_lightning too)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)], nn.Linear(8, 2))
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g))
    strategy = "model_parallel" if devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    out.mkdir(parents=True, exist_ok=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"losses": model.losses, "params": params}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()

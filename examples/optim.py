"""The optimizer the recipes share: AdamW with a linear learning-rate warm-up, stepped every batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def adamw_with_warmup(model: nn.Module, lr: float, weight_decay: float, warmup_steps: int) -> dict[str, Any]:
    """``configure_optimizers``'s return value: AdamW over ``model``'s parameters, warmed up over ``warmup_steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

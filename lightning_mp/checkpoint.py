"""Checkpoints in the model's own names: the stages' state gathered into one ordinary Lightning checkpoint.

Each stage contributes the parameters and buffers it holds; rank 0 merges them into the state dict of the whole,
unsplit model, so the file loads with a plain ``LightningModule.load_state_dict`` and into any pipeline layout.
Optimizer state is keyed by parameter name instead of position for the same reason. The gather goes through rank 0's
memory; a sharded, distributed checkpoint is the way for models that do not fit there.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_mp.stage import is_placeholder


def gather_to_rank_zero(local: Any, is_contributor: bool) -> list[Any] | None:
    """Every rank's ``local`` (None where ``is_contributor`` is False) as a list on global rank 0, None elsewhere."""
    if not (dist.is_available() and dist.is_initialized()):
        return [local]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local if is_contributor else None, gathered, dst=0)
    return [g for g in gathered if g is not None] if gathered is not None else None


def full_state_dict(module: nn.Module, is_contributor: bool) -> dict[str, Any]:
    """The whole model's state dict on rank 0 (empty elsewhere), merged from every stage's own entries."""
    local = {k: v.detach().cpu() for k, v in module.state_dict().items() if not is_placeholder(k)}
    parts = gather_to_rank_zero(local, is_contributor)
    merged: dict[str, Any] = {}
    for part in parts or []:
        merged.update(part)
    return merged


def named_optimizer_state(optimizer: Optimizer, module: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named instead of numbered."""
    names = {id(p): n for n, p in module.named_parameters()}
    state = optimizer.state_dict()
    ordered = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {ordered[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def merge_optimizer_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One named optimizer state from the stages' parts (same groups, each holding its own parameters)."""
    merged: dict[str, Any] = {"state": {}, "param_groups": []}
    for part in parts:
        merged["state"].update(part["state"])
        for i, group in enumerate(part["param_groups"]):
            if i == len(merged["param_groups"]):
                merged["param_groups"].append({**group, "params": []})
            merged["param_groups"][i]["params"] += [
                p for p in group["params"] if p not in merged["param_groups"][i]["params"]
            ]
    return merged


def load_named_optimizer_state(optimizer: Optimizer, module: nn.Module, named: dict[str, Any]) -> None:
    """Load the entries of a named optimizer state that belong to this stage's ``optimizer``.

    Raises:
        ValueError: the saved optimizer has other parameter groups than this one.
    """
    if len(named["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(named['param_groups'])} parameter groups, this one"
            f" {len(optimizer.param_groups)}: configure_optimizers must build the same groups to resume."
        )
    names = {id(p): n for n, p in module.named_parameters()}
    local_names = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(local_names)}
    groups = [
        {**{k: v for k, v in saved.items() if k != "params"}, "params": [index[names[id(p)]] for p in group["params"]]}
        for group, saved in zip(optimizer.param_groups, named["param_groups"])
    ]
    state = {index[n]: s for n, s in named["state"].items() if n in index}
    optimizer.load_state_dict({"state": state, "param_groups": groups})

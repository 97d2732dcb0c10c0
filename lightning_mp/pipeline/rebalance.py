"""Moving layers between stages while training: parameters, buffers and optimizer state go to their new stage.

Between two optimizer steps, every rank applies the same new balance: a stage sends each layer it gives up (its
state dict, and for each parameter the optimizer state and the parameter group it sits in) to the stage that takes
it, then receives the layers it takes (layers move one way across each stage boundary, so a chain of sends and receives
completes, with blocking sends too). Tensors travel on the device, CPU-held optimizer state (Adam's ``step``)
included, and land where they were kept.
Parameters keep their names, so checkpoints and logs are unaffected, and training continues to the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.pipeline.stage import StageRuntime
from lightning_mp.runtime.messages import P2P, broadcast_object


def stage_of_layers(balance: list[int]) -> list[int]:
    """The stage of every layer under ``balance``."""
    return [s for s, count in enumerate(balance) for _ in range(count)]


def move_layers(
    runtime: StageRuntime,
    optimizers: list[Optimizer],
    new_balance: list[int],
    pp_ranks: list[int],
    device: torch.device,
) -> tuple[list[int], list[int]]:
    """Apply ``new_balance`` on this rank; returns (layers sent away, layers taken in)."""
    before, after = stage_of_layers(runtime.plan.balance), stage_of_layers(new_balance)
    me = runtime.stage
    outgoing = [i for i, (a, b) in enumerate(zip(before, after)) if a == me != b]
    incoming = [i for i, (a, b) in enumerate(zip(before, after)) if b == me != a]
    p2p = P2P(device)
    with torch.no_grad():
        for i in outgoing:
            block = runtime.plan.layers.layer(i)
            payload = {
                "state": {k: v.detach() for k, v in block.state_dict().items()},
                "optimizer": _take_optimizer_state(optimizers, block, device),
            }
            p2p.send_activation(payload, pp_ranks[after[i]])
            runtime.release_layer(i)
        for i in incoming:
            payload = p2p.recv_activation(pp_ranks[before[i]]).value
            block = runtime.adopt_layer(i, payload["state"], device)
            _give_optimizer_state(optimizers, block, payload["optimizer"])
        p2p.wait_sends()
    runtime.set_balance(new_balance)
    return outgoing, incoming


def _take_optimizer_state(optimizers: list[Optimizer], block: nn.Module, device: torch.device) -> dict[str, Any]:
    """Remove the block's parameters from the optimizers; return, by name, (optimizer, group, state, the keys of
    the state tensors kept on the CPU) of each. Every tensor travels on ``device`` (NCCL sends device tensors only;
    Adam keeps its ``step`` on the CPU), and the receiver puts the CPU ones back there."""
    taken = {}
    for name, param in block.named_parameters():
        for o, optimizer in enumerate(optimizers):
            for g, group in enumerate(optimizer.param_groups):
                if any(q is param for q in group["params"]):
                    group["params"] = [q for q in group["params"] if q is not param]
                    state = optimizer.state.pop(param, {})
                    on_cpu = [k for k, v in state.items() if isinstance(v, Tensor) and v.device.type == "cpu"]
                    state = {k: v.detach().to(device) if isinstance(v, Tensor) else v for k, v in state.items()}
                    taken[name] = (o, g, state, on_cpu)
        param.grad = None
    return taken


def _give_optimizer_state(optimizers: list[Optimizer], block: nn.Module, taken: dict[str, Any]) -> None:
    """Put the block's parameters into the groups they came from, with their optimizer state."""
    params = dict(block.named_parameters())
    for name, (o, g, state, on_cpu) in taken.items():
        param = params[name]
        optimizers[o].param_groups[g]["params"].append(param)
        if state:
            optimizers[o].state[param] = {
                k: (v.to("cpu") if k in on_cpu else v.clone()) if isinstance(v, Tensor) else v for k, v in state.items()
            }


def maybe_rebalance(runner: Any, optimizers: list[Optimizer], min_steps: int, device: torch.device) -> None:
    """After ``min_steps`` measured steps, move layers if the monitor advises it (then measure afresh).

    The decision is global rank 0's: data-parallel replicas measure different times but must split alike.
    """
    monitor = runner.monitor
    if monitor is None or monitor.steps < monitor.warmup + min_steps:
        return
    better = broadcast_object(monitor.suggestion(), 0, None, device)
    if better is not None:
        runtime = runner.runtime
        old = list(runtime.plan.balance)
        move_layers(runtime, optimizers, better, runner.pp_ranks, device)
        if runner.executor.deferred is not None:  # adopted layers defer their weight gradients too
            runner.executor.deferred.install([runtime.plan.layers.layer(i) for i in runtime.own_layers])
        rank_zero_info(f"lightning-mp: rebalanced the pipeline from balance={old} to balance={better}")
    runner.reset_monitor()

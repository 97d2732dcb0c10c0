"""Measuring the user's step for the planner at set-up: the first batch of the data, and the per-layer costs of one
real micro-batch of it (see ``plan.profiling``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_mp.observe.step_logs import LogRecords, capture_logs, preserved_metric_states
from lightning_mp.pipeline.losses import step_loss
from lightning_mp.pipeline.microbatch import split_batch
from lightning_mp.plan.discovery import ModelLayers
from lightning_mp.plan.flow import LayerFlow, observe_layer_inputs
from lightning_mp.plan.profiling import LayerCosts, observe_call_order, preserved_random_state, profile_layers
from lightning_mp.runtime.messages import broadcast_object
from lightning_mp.runtime.tree import tree_map


def measure_step_costs(
    module: Any, hook: str, batch: Any, microbatches: int, backward: bool, on: torch.device | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> Callable:  # fmt: skip
    """A ``measure`` for :func:`build_plan`: the user's ``hook`` on the first micro-batch of ``batch``.

    A model on the meta device is measured in FLOPs on a meta copy of the micro-batch (see ``profiling``). With
    ``on`` (the run's device, where the model is elsewhere), each layer is timed alone there, under ``context``.
    """

    def measure(found: ModelLayers) -> LayerCosts:
        run_step = step_on_first_microbatch(module, hook, batch, microbatches)

        def run() -> Tensor | None:
            loss = run_step()
            return loss if backward else None

        with torch.enable_grad() if backward else torch.no_grad():
            return profile_layers(module, found, run, on=on, context=context)

    return measure


def step_call_order(module: Any, hook: str, batch: Any, microbatches: int) -> list[str]:
    """The order in which the user's ``hook`` first calls the model's submodules, on one micro-batch of ``batch``."""
    return observe_call_order(module, step_on_first_microbatch(module, hook, batch, microbatches))


def step_flow(module: Any, hook: str, batch: Any, microbatches: int, found: ModelLayers) -> LayerFlow:
    """What each layer of ``found`` is called with when the user's ``hook`` runs one micro-batch of ``batch``."""
    return observe_layer_inputs(module, found, step_on_first_microbatch(module, hook, batch, microbatches))


def step_on_first_microbatch(module: Any, hook: str, batch: Any, microbatches: int) -> Callable[[], Tensor | None]:
    """Runs the user's ``hook`` on the first micro-batch of ``batch`` (``self.log`` swallowed); returns its loss."""
    microbatch = split_batch(batch, microbatches)[0][0]
    if any(p.is_meta for p in module.parameters()):  # planned without memory: the batch goes to meta too
        microbatch = tree_map(lambda t: t.to("meta"), microbatch)

    def run_step() -> Tensor | None:
        with capture_logs(module, LogRecords(), 1.0), preserved_metric_states(module):
            output = getattr(module, hook)(microbatch, 0)
        return step_loss(output, hook, strict=False)

    return run_step


def first_batch(trainer: Any, to_device: Callable[[Any], Any]) -> tuple[Any, str | None]:
    """(the first batch of the trainer's current dataloader, moved by ``to_device``; or None and what went wrong).

    Taking it does not change what training sees: a shuffling sampler's generators are restored afterwards.
    """
    loop = getattr(trainer, f"{_fn(trainer)}_loop")
    try:
        loader = loop._data_source.dataloader()
        with preserved_random_state(*_generators_of(loader)):
            batch = next(iter(loader))
    except Exception as err:  # any failure of the user's dataloader hook means: no batch to measure
        return None, f"{type(err).__name__}: {err}"
    return to_device(batch), None


@dataclass
class SetupProbe:
    """What set-up learns from one micro-batch of the data, on global rank 0, for every rank: how to measure the
    layers' costs (when the plan needs them), and the order the step calls the model's modules in."""

    measure: Callable[[ModelLayers], LayerCosts] | None = None
    call_order: list[str] | None = None
    observe_flow: Callable[[ModelLayers], LayerFlow] | None = None


def probe_model(
    trainer: Any, module: Any, balance: Any, wanted: bool, microbatches: int, device: torch.device, rank: int,
    to_device: Callable[[Any, torch.device], Any], context: Callable[[], AbstractContextManager] = nullcontext,
) -> SetupProbe:  # fmt: skip
    """Take the first batch of the data the trainer is about to use (global rank 0) and observe the step on it.

    The step runs where the whole model is (the CPU at set-up; ``to_device(batch, device)`` moves the batch there):
    no rank's device ever holds the whole model. Costs are measured when ``balance`` ("time", "memory") or
    ``wanted`` (max_memory, schedule="auto") needs them, each layer alone on rank 0's ``device`` under ``context``
    (the run's precision) when the model is elsewhere; every rank receives the same results. Without a batch (no
    dataloader yet, an empty one), modules are placed by registration order and, when costs were needed, a warning
    says why ("time"/"memory" then plan as "params").
    """
    home = model_device(module)
    batch, problem = first_batch(trainer, lambda b: to_device(b, home)) if rank == 0 else (None, None)
    problem = broadcast_object(problem, 0, None, device)
    needs_costs = balance in ("time", "memory") or wanted
    if problem is not None:
        if needs_costs:
            rank_zero_warn(
                f"lightning-mp: balance={balance!r} measures the model on one batch of its data at set-up and could"
                f" not get one ({problem}); using balance='params' instead, and max_memory is not checked."
            )
        return SetupProbe()
    fitting = _fn(trainer) == "fit"
    hook = step_hook(trainer)
    order = step_call_order(module, hook, batch, microbatches) if rank == 0 else None
    probe = SetupProbe(call_order=broadcast_object(order, 0, None, device))

    def observe_flow(found: ModelLayers) -> LayerFlow:
        flow = step_flow(module, hook, batch, microbatches, found) if rank == 0 else None
        return broadcast_object(flow, 0, None, device)

    probe.observe_flow = observe_flow
    if not needs_costs:
        return probe

    def measure(found: ModelLayers) -> LayerCosts:
        costs = None
        if rank == 0:
            measure = measure_step_costs(module, hook, batch, microbatches, fitting, on=device, context=context)
            costs = measure(found).as_dict()
        return LayerCosts(**broadcast_object(costs, 0, None, device))

    probe.measure = measure
    return probe


def model_device(module: Any) -> torch.device:
    """Where the whole model is before the split (its first parameter's device; the CPU for a model on the meta
    device, whose batch goes to meta later, or one without parameters)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return torch.device("cpu") if device.type == "meta" else device


_HOOKS = {"fit": "training_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}


def step_hook(trainer: Any) -> str:
    """The LightningModule hook the trainer is about to run: "training_step", "validation_step", ..."""
    return _HOOKS[_fn(trainer)]


def _fn(trainer: Any) -> str:
    """What the trainer is running: "fit", "validate", "test" or "predict" (either Lightning package's enum)."""
    return str(trainer.state.fn.value)


def _generators_of(loader: Any) -> list[torch.Generator]:
    """The random generators a DataLoader (and its sampler, batch sampler) draws from."""
    owners = [
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    found: list[torch.Generator] = []
    for owner in owners:
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found

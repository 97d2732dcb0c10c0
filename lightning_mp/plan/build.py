"""Deciding the split: find the layers, measure them when asked, and solve for the balance (pure, the same on every
rank). ``build_plan`` returns the :class:`~lightning_mp.pipeline.stage.StagePlan` that ``StageRuntime`` applies.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

from torch import nn

from lightning_mp.plan.cost_model import PlanPrediction, StageCostModel
from lightning_mp.plan.discovery import ModelLayers, discover_layers
from lightning_mp.plan.flow import LayerFlow
from lightning_mp.plan.partition import (
    InfeasiblePartition,
    check_explicit_balance,
    optimal_balance,
    optimal_partition,
    uniform_balance,
)
from lightning_mp.plan.profiling import LayerCosts
from lightning_mp.plan.schedule_choice import ScheduleEstimate, estimate_schedules, pick_schedule
from lightning_mp.plan.stage_plan import StagePlan, stage_parameters
from lightning_mp.runtime.errors import ModelSplitError

BalanceSpec = Union[Literal["uniform", "params", "time", "memory"], Sequence[int]]


def build_plan(
    root: nn.Module,
    num_stages: int,
    balance: BalanceSpec = "uniform",
    layers: str | None = None,
    measure: Callable[[ModelLayers], LayerCosts] | None = None,
    schedule: str = "1f1b",
    microbatches: int = 1,
    max_memory: float | None = None,
    call_order: list[str] | None = None,
    observe_flow: Callable[[ModelLayers], LayerFlow] | None = None,
) -> StagePlan:
    """Find the layers of ``root`` and assign them to ``num_stages`` stages.

    Args:
        root: the full model (a LightningModule).
        num_stages: pipeline_parallel_size.
        balance: "uniform" (equal layer counts), "params" (equal parameter counts, counting the modules before the
            layers on the first stage and those after on the last), "time" (equal measured forward+backward time),
            "memory" (equal predicted peak memory under ``schedule``), or a list of layer counts per stage.
        layers: dotted name of the layer container; found automatically when None.
        measure: returns the measured per-layer costs of one micro-batch (required by "time" and "memory"; with any
            balance it adds a prediction of per-stage time and memory to the plan).
        schedule, microbatches: the pipeline the plan is for (activations in flight, bubble).
        max_memory: bytes a stage may use (needs ``measure``): "time" then minimizes time among the splits that fit,
            and any plan predicted above it is refused with the number of stages that would fit.
        call_order: submodule names in the order one observed forward called them: the modules outside the
            layers are placed where they ran, and containers run in sequence are split as one (see
            ``discover_layers``).
        observe_flow: returns what each layer is called with on one micro-batch (see ``plan.flow``): tensors that
            cross a stage boundary beside the activation travel with it.

    Raises:
        ModelSplitError: the model cannot be split this way; the message names the setting that fixes it.
    """
    if any(getattr(m, "is_stand_in", False) for m in root.modules()):
        raise ModelSplitError(
            f"this {type(root).__name__} was already split into pipeline stages by another Trainer: run fit, validate"
            " and test with the same Trainer, or build a fresh model (or load the saved checkpoint into one)."
        )
    found = discover_layers(root, layers, call_order)
    if observe_flow is not None and num_stages > 1:
        flow = observe_flow(found)
        found.inputs, found.late_uses = flow.inputs, flow.late_uses
    model = None
    if measure is not None:
        layer_bytes = [_param_bytes(found.layer(i).parameters()) for i in range(found.num_layers)]
        model = StageCostModel(
            measure(found),
            layer_bytes,
            int(_direct_params(root, found.pre, bytes_=True)),
            int(_direct_params(root, found.post, bytes_=True)),
            num_stages,
            schedule,
            microbatches,
        )
    if isinstance(balance, str):
        if balance == "uniform":
            counts = uniform_balance(found.num_layers, num_stages)
        elif balance == "params":
            costs = [sum(p.numel() for p in found.layer(i).parameters()) for i in range(found.num_layers)]
            first = _direct_params(root, found.pre)
            last = _direct_params(root, found.post)
            counts = optimal_balance(costs, num_stages, first, last)
        elif balance in ("time", "memory"):
            if model is None:
                raise ValueError(f"balance={balance!r} needs measured layer costs (measure=...).")
            try:
                counts = optimal_partition(found.num_layers, num_stages, model.function(balance, max_memory))
            except InfeasiblePartition:  # nothing fits: take the leanest split; check_memory_limit explains
                counts = optimal_partition(found.num_layers, num_stages, model.memory)
        else:
            raise ValueError(
                f"balance={balance!r} is not supported: use 'uniform', 'params', 'time', 'memory' or a list of"
                " layer counts."
            )
        method = balance
    else:
        counts = check_explicit_balance(balance, found.num_layers, num_stages)
        method = "explicit"
    plan = StagePlan(found, counts, method)
    check_late_uses(plan)
    plan.param_counts = [sum(p.numel() for p in stage_parameters(root, plan, s)) for s in range(num_stages)]
    if model is not None:
        plan.prediction = PlanPrediction.of(model, counts)
        if max_memory is not None:
            check_memory_limit(model, plan.prediction, found.num_layers, max_memory)
    return plan


def check_late_uses(plan: StagePlan) -> None:
    """Refuse a plan where a layer's output is used after the last layer but lives on another stage than the last.

    Raises:
        ModelSplitError: naming the layer, the operation and the fix.
    """
    last = plan.num_stages - 1
    for layer, operation in plan.layers.late_uses:
        if plan.stage_of_layer(layer) != last:
            name = plan.layers.layer_names[layer]
            raise ModelSplitError(
                f"the output of layer {name} (stage {plan.stage_of_layer(layer)}) is used after the last layer, by"
                f" {operation} on the last stage (e.g. output_hidden_states=True, or a weighted sum of layers):"
                " lightning-mp carries layer outputs to the next stage only. Compute the loss from the last layer's"
                " output, or give the last stage every layer whose output it reads (balance=[...])."
            )


def choose_schedule(root: nn.Module, layers: str | None = None) -> str:
    """What ``schedule="auto"`` runs without measured costs: "zero_bubble" when the layers hold trainable
    ``nn.Linear`` modules whose weight gradients can be deferred (its bubble is smaller than 1F1B's at the same
    memory, and GPipe's memory is larger at the same bubble), otherwise "1f1b". Under autocast too: the deferred
    products are computed as autocast computes them (weight_grads.py). With measured costs,
    :func:`choose_schedule_by_cost` decides."""
    return "zero_bubble" if _can_defer(discover_layers(root, layers)) else "1f1b"


def _can_defer(found: ModelLayers) -> bool:
    return any(
        type(m) is nn.Linear and m.weight.requires_grad
        for i in range(found.num_layers)
        for m in found.layer(i).modules()
    )


def choose_schedule_by_cost(
    root: nn.Module,
    found: ModelLayers,
    costs: LayerCosts,
    pipeline_parallel_size: int,
    microbatches: int,
    max_memory: float | None = None,
    interleave: bool = True,
) -> tuple[ScheduleEstimate, list[ScheduleEstimate]]:
    """``schedule="auto"`` with measured layer costs: (the chosen schedule's estimate, every candidate's); see
    :mod:`lightning_mp.plan.schedule_choice`. ``interleave=False`` leaves interleaving out (an explicit balance
    list)."""
    estimates = estimate_schedules(
        costs,
        [_param_bytes(found.layer(i).parameters()) for i in range(found.num_layers)],
        int(_direct_params(root, found.pre, bytes_=True)),
        int(_direct_params(root, found.post, bytes_=True)),
        pipeline_parallel_size,
        microbatches,
        _can_defer(found),
    )
    if not interleave:
        estimates = [e for e in estimates if e.virtual_stages == 1]
    return pick_schedule(estimates, max_memory), estimates


def check_memory_limit(model: StageCostModel, prediction: PlanPrediction, num_layers: int, max_memory: float) -> None:
    """Raise when a stage of the plan is predicted above ``max_memory`` bytes, with the fewest stages that fit.

    Raises:
        ModelSplitError: naming the stage, its predicted memory, and the pipeline_parallel_size that would fit.
    """
    worst = max(range(len(prediction.stage_memory)), key=lambda s: prediction.stage_memory[s])
    if prediction.stage_memory[worst] <= max_memory:
        return
    fits = None
    for stages in range(model.num_stages + 1, num_layers + 1):
        wider = dataclasses.replace(model, num_stages=stages)
        counts = optimal_partition(num_layers, stages, wider.memory)
        bounds = itertools.accumulate([0, *counts])
        starts = list(bounds)
        if max(wider.memory(s, starts[s], starts[s + 1]) for s in range(stages)) <= max_memory:
            fits = stages
            break
    fix = (
        f"at least pipeline_parallel_size={fits} stages fit"
        if fits
        else "no split of these layers fits: reduce microbatches or the micro-batch size, or use schedule='1f1b'"
    )
    raise ModelSplitError(
        f"stage {worst} is predicted to need {prediction.stage_memory[worst] / 2**30:.2f} GiB, over"
        f" max_memory={max_memory / 2**30:.2f} GiB (parameters, gradients, Adam states and in-flight activations);"
        f" {fix}."
    )


def _param_bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _direct_params(root: nn.Module, names: list[str], bytes_: bool = False) -> float:
    """Parameters (or their bytes) held directly by the named modules, each counted once."""
    seen: set[int] = set()
    total = 0
    for name in names:
        for p in root.get_submodule(name).parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * (p.element_size() if bytes_ else 1)
    return float(total)

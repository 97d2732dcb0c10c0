"""The stage plan without training: what ``ModelParallel`` would do with a model, a batch and a configuration.

    >>> plan = lightning_mp.dry_run(model, batch, pipeline_parallel_size=2, balance="time", microbatches=8)
    >>> print(plan.format()); json.dump(plan.to_dict(), f)

It runs in one process: it measures the layers on one micro-batch of ``batch`` (when one is given) and prints, per
stage, its ranks, layers, parameters, predicted time and memory, and the predicted step time, bubble and imbalance.
The model is left as it was.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_mp.discovery import discover_layers
from lightning_mp.layout import ParallelLayout, SizeSpec, parse_bytes
from lightning_mp.planning import BalanceSpec, build_plan, choose_schedule, choose_schedule_by_cost, measure_step_costs
from lightning_mp.schedules import chunks_of, stage_ranks
from lightning_mp.stage import StagePlan, stage_parameters
from lightning_mp.tp_plan import plan_tensor_parallel


def dry_run(
    model: nn.Module,
    batch: Any = None,
    *,
    devices: int | None = None,
    pipeline_parallel_size: SizeSpec = "auto",
    data_parallel_size: SizeSpec = "auto",
    tensor_parallel_size: int = 1,
    microbatches: int | str = "auto",
    schedule: str = "1f1b",
    balance: BalanceSpec = "uniform",
    layers: str | None = None,
    hook: str = "training_step",
    max_memory: int | float | str | None = None,
    tensor_parallel_plan: dict[str, str] | None = None,
    virtual_stages: int | None = None,
) -> tuple[StagePlan, dict[str, Any]]:
    """Plan ``model`` as :class:`~lightning_mp.ModelParallel` would, without processes; returns (plan, JSON dict).

    Args:
        model: the LightningModule (or any module whose ``hook`` takes ``(batch, batch_idx)``).
        batch: one batch of real data; needed for balance "time"/"memory", and gives predictions for any balance.
        devices: the world size (devices × nodes); defaults to pipeline_parallel_size when that is an int.
        Other arguments: as for :class:`~lightning_mp.ModelParallel`. With ``tensor_parallel_size`` > 1 the report
        also holds the tensor-parallel plan (``tensor_parallel``, and ``tensor_parallel_text`` to print) with each
        stage's parameter memory per rank. ``schedule="auto"`` with a batch compares the candidate schedules on the
        measured costs (``schedule_estimates``: each one's predicted step time and peak memory).
    """
    world = (
        devices if devices is not None else (pipeline_parallel_size if isinstance(pipeline_parallel_size, int) else 1)
    )
    layout = ParallelLayout.resolve(world, data_parallel_size, pipeline_parallel_size, tensor_parallel_size)
    m = 2 * layout.pp if microbatches == "auto" else int(microbatches)
    measure = measure_step_costs(model, hook, batch, m, backward=hook == "training_step") if batch is not None else None
    limit = parse_bytes(max_memory) if max_memory is not None else None
    v = chunks_of(schedule) or virtual_stages or (2 if schedule == "interleaved_1f1b" else 1)
    estimates = None
    if schedule == "auto" and measure is not None:
        found = discover_layers(model, layers)
        costs = measure(found)
        chosen, estimates = choose_schedule_by_cost(
            model, found, costs, layout.pp, m, limit, interleave=isinstance(balance, str)
        )
        schedule, v, measure = chosen.schedule, chosen.virtual_stages, (lambda _: costs)
    elif schedule == "auto":
        schedule = choose_schedule(model, layers)
    plan = build_plan(model, layout.pp * v, balance, layers, measure, "1f1b" if v > 1 else schedule, m, limit)
    if v > 1:
        plan.prediction, plan.stage_ranks = None, stage_ranks(schedule, layout.pp, v)
    placement = plan.stage_ranks or list(range(layout.pp))
    ranks = [
        [layout.rank_of(d, placement[s], t) for d in range(layout.dp) for t in range(layout.tp)]
        for s in range(plan.num_stages)
    ]
    report = plan.to_dict(ranks)
    report.update(layout={"dp": layout.dp, "pp": layout.pp, "tp": layout.tp}, schedule=schedule, microbatches=m)
    report["virtual_stages"] = v
    if estimates is not None:
        report["schedule_estimates"] = [e.as_dict() for e in estimates]
    if layout.tp > 1:
        tp_plan = plan_tensor_parallel(model, plan.layers.container_name, layout.tp, tensor_parallel_plan)
        memory = tp_plan.memory_report(model, [stage_parameters(model, plan, s) for s in range(plan.num_stages)])
        report["tensor_parallel"] = {**tp_plan.to_dict(), "parameters_per_rank": memory}
        report["tensor_parallel_text"] = tp_plan.format() + "\n" + tp_plan.format_memory(memory)
    return plan, report

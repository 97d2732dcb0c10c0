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

from lightning_mp.options import StrategyOptions, resolve_microbatches
from lightning_mp.parallelize import plan_model
from lightning_mp.pipeline.measure import measure_step_costs, step_call_order, step_flow
from lightning_mp.plan.stage_plan import StagePlan
from lightning_mp.runtime.layout import ParallelLayout


def dry_run(
    model: nn.Module,
    batch: Any = None,
    *,
    devices: int | None = None,
    hook: str = "training_step",
    **options: Any,
) -> tuple[StagePlan, dict[str, Any]]:
    """Plan ``model`` as :class:`~lightning_mp.ModelParallel` would, without processes; returns (plan, JSON dict).

    The plan is the one training would use: the same options (``**options``: any of ``ModelParallel``'s, with its
    defaults), checked by the same rules, planned by the same function (:func:`~lightning_mp.parallelize.plan_model`).

    Args:
        model: the LightningModule (or any module whose ``hook`` takes ``(batch, batch_idx)``).
        batch: one batch of real data; needed for balance "time"/"memory" (without it they fall back to "params", as
            in training without a batch), and gives predictions for any balance.
        devices: the world size (devices × nodes); defaults to pipeline_parallel_size when that is an int.

    With ``tensor_parallel_size`` > 1 the report also holds the tensor-parallel plan (``tensor_parallel``, and
    ``tensor_parallel_text`` to print) with each stage's parameter memory per rank. ``schedule="auto"`` with a batch
    compares the candidate schedules on the measured costs (``schedule_estimates``).
    """
    opts = StrategyOptions(**options)
    pp = opts.pipeline_parallel_size
    world = devices if devices is not None else (pp if isinstance(pp, int) else 1)
    layout = ParallelLayout.resolve(world, opts.data_parallel_size, pp, opts.tensor_parallel_size)
    m = resolve_microbatches(opts.microbatches, layout.pp)
    measure = order = flow = None
    if batch is not None:
        measure = measure_step_costs(model, hook, batch, m, backward=hook == "training_step")
        order = step_call_order(model, hook, batch, m)
        flow = lambda found: step_flow(model, hook, batch, m, found)  # noqa: E731
    planned = plan_model(model, opts, layout, m, measure, call_order=order, observe_flow=flow)
    plan = planned.plan
    placement = plan.stage_ranks or list(range(layout.pp))
    ranks = [
        [layout.rank_of(d, placement[s], t) for d in range(layout.dp) for t in range(layout.tp)]
        for s in range(plan.num_stages)
    ]
    report = plan.to_dict(ranks)
    report.update(layout={"dp": layout.dp, "pp": layout.pp, "tp": layout.tp}, schedule=planned.schedule)
    report.update(microbatches=m, virtual_stages=planned.virtual_stages)
    if layout.dp > 1:  # bytes per rank at the data_parallel_sharding level
        report["data_parallel"] = planned.dp_memory(model, layout)
    if planned.estimates is not None:
        report["schedule_estimates"] = [e.as_dict() for e in planned.estimates]
    if planned.tp_plan is not None:
        memory = planned.tp_memory(model)
        report["tensor_parallel"] = {**planned.tp_plan.to_dict(), "parameters_per_rank": memory}
        report["tensor_parallel_text"] = planned.tp_plan.format() + "\n" + planned.tp_plan.format_memory(memory)
    return plan, report

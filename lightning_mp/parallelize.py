"""Making one rank's part of the model, in a fixed order: plan the whole model (:func:`plan_model`, the same on every
rank and in ``dry_run``), split it into this rank's stage, materialize its meta-device parameters, create the
gradient groups, apply tensor parallelism.

:func:`parallelize` is what ``ModelParallel.setup`` runs after planning; its result, :class:`ParallelModel`, is what the
strategy's hooks delegate to (steps, gradient sync, full parameters).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.init import _materialize_meta_tensors
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_mp.checkpoint.distributed import Shards
from lightning_mp.options import StrategyOptions, resolve_microbatches
from lightning_mp.pipeline.grads import GradientSync, GradStash
from lightning_mp.pipeline.measure import first_batch, model_device, probe_model, step_hook, step_on_first_microbatch
from lightning_mp.pipeline.runner import PipelineRunner
from lightning_mp.pipeline.stage import StageRuntime
from lightning_mp.plan.build import build_plan, choose_schedule, choose_schedule_by_cost
from lightning_mp.plan.discovery import discover_layers
from lightning_mp.plan.profiling import LayerCosts
from lightning_mp.plan.schedules import stage_ranks
from lightning_mp.plan.stage_plan import StagePlan, is_placeholder, stage_parameters
from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.runtime.groups import replica_groups, shared_weight_groups
from lightning_mp.runtime.layout import ParallelLayout
from lightning_mp.runtime.messages import P2P
from lightning_mp.tensor.plan import (
    TensorParallelPlan,
    TensorParallelState,
    apply_tensor_parallel,
    plan_tensor_parallel,
)
from lightning_mp.tensor.self_check import self_check
from lightning_mp.tensor.shard import TPGroup, gather_full
from lightning_mp.tensor.vocab_loss import loss_parallel

Measure = Callable[[Any], LayerCosts]


@dataclass
class RankContext:
    """What the strategy knows of this rank's processes."""

    layout: ParallelLayout
    mesh: Any  # the (dp, pp, tp) DeviceMesh
    rank: int
    device: torch.device
    p2p: P2P


@dataclass
class ParallelModel:
    """This rank's part of the model and what runs it."""

    plan: StagePlan
    runner: PipelineRunner
    schedule: str  # as run ("auto" resolved)
    virtual_stages: int
    tp_plan: TensorParallelPlan | None = None
    tensor: TensorParallelState | None = None
    grads: GradientSync = field(default_factory=GradientSync)
    global_tokens: bool = False  # loss_normalization="global_tokens": normalise by the tokens of every replica
    stash: GradStash = field(default_factory=GradStash)
    window_end: bool = False  # the running step is the last of an accumulation window (an optimizer step follows)

    def train_step(self, module: nn.Module, batch: Any, rest: tuple, accumulate: int) -> Tensor | None:
        """One training step of this stage; its gradients are kept apart until Lightning's ``backward``, normalised
        as one process would (by the batch's token count when the loss is a recognised token mean). With dp > 1
        the step that ends a window hands its gradients to the data-parallel buckets instead
        (:class:`~lightning_mp.pipeline.sharding.DataParallelSharding`)."""
        sharding = self.grads.sharding
        self.stash.begin(p for p in module.parameters() if p.requires_grad)
        if sharding is not None:
            sharding.begin_step(self.stash, self.window_end)
        scale = 1.0
        try:
            loss, norm = self.runner.train_step("training_step", batch, rest, 1.0 / accumulate)
            if norm is not None:
                ref, count = norm
                if self.global_tokens and self.grads.dp_group is not None:  # every replica's tokens count alike
                    replicas = dist.get_world_size(self.grads.dp_group)
                    total = torch.tensor([count], dtype=torch.float64, device=self.runner.device)
                    dist.all_reduce(total, group=self.grads.dp_group)
                    count = float(total) / replicas  # the averaging over replicas then divides by the rest
                scale = ref / count if count else float("nan")
        finally:
            self.stash.end(scale)
        if sharding is not None:
            sharding.end_step(self.stash, self.window_end, self.grads.sum_late)
        return loss

    def shard_data_parallel(self, module: nn.Module, optimizers: list[Any], level: str, bucket_bytes: int) -> None:
        """With dp > 1: reduce gradients in overlapped buckets and, above ``"none"``, shard the optimizer state (and
        gradients, parameters) over the replicas (pipeline/sharding.py). Called once the optimizer exists."""
        from lightning_mp.pipeline.sharding import DataParallelSharding

        group = self.grads.dp_group
        if group is None or self.grads.sharding is not None:
            return
        if len(optimizers) != 1:
            raise ValueError(
                f"data-parallel reduction in lightning-mp handles one optimizer, configure_optimizers returned"
                f" {len(optimizers)}: return one (with parameter groups for different settings)."
            )
        optimizer = getattr(optimizers[0], "_optimizer", optimizers[0])
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        sharding = DataParallelSharding(
            module, optimizer, level, group, rank, world, self.grads.late_params(), int(bucket_bytes)
        )
        sharding.speculate = not self.global_tokens  # its token count all-reduce shares the dp group mid-step
        self.grads.sharding = sharding

    def shards(self) -> Shards | None:
        """How this rank's tensor-parallel parameters are split, for checkpoints (None without tp)."""
        if self.tensor is None:
            return None
        return Shards(self.tensor.specs, dist.get_process_group_ranks(self.tensor.tp.group))

    def whole(self) -> Any:
        """A context in which every parameter holds its whole value (``data_parallel_sharding="full"`` releases
        them between steps); a collective of the dp group then."""
        sharding = self.grads.sharding
        return sharding.whole() if sharding is not None else contextlib.nullcontext()

    def full_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """This stage's parameters by name, those split over the tp group gathered whole (a collective of it)."""
        with self.whole():
            return self._full_parameters(module)

    def _full_parameters(self, module: nn.Module) -> dict[str, Tensor]:
        full = {}
        for name, param in module.named_parameters():
            if is_placeholder(name):
                continue
            spec = self.tensor.specs.get(name) if self.tensor is not None else None
            full[name] = gather_full(param.detach(), self.tensor.tp, spec) if spec else param.detach().clone()
        return full


@dataclass
class ModelPlan:
    """Everything decided about the whole model before any rank changes it: the same on every rank."""

    plan: StagePlan
    schedule: str  # "auto" resolved
    virtual_stages: int
    tp_plan: TensorParallelPlan | None = None
    estimates: list[Any] | None = None  # schedule="auto" with measured costs: each candidate's prediction
    data_parallel_sharding: str = "none"

    def format(self, module: nn.Module, layout: ParallelLayout, microbatches: int) -> str:
        """The plan as rank 0 prints it: stages, the tensor-parallel plan and memory, the layout."""
        text = self.plan.format()
        if self.tp_plan is not None:
            memory = self.tp_memory(module)
            text += "\n" + self.tp_plan.format() + "\n" + self.tp_plan.format_memory(memory)
        m = 1 if self.schedule == "none" else microbatches
        if layout.dp > 1:
            text += "\n" + self.dp_memory(module, layout)["text"]
        return text + f"\n  layout: {layout}, schedule={self.schedule}, microbatches={m}"

    def dp_memory(self, module: nn.Module, layout: ParallelLayout) -> dict[str, Any]:
        """Each stage's parameter, gradient and optimizer bytes per rank at the data-parallel sharding level (the
        stage's whole parameters: with tp > 1 each rank holds its tensor-parallel part of these)."""
        from lightning_mp.pipeline.sharding import sharded_memory_report

        stages = [stage_parameters(module, self.plan, s) for s in range(self.plan.num_stages)]
        stage_bytes = [sum(p.numel() * p.element_size() for p in ps if p.requires_grad) for ps in stages]
        return sharded_memory_report(stage_bytes, layout.dp, self.data_parallel_sharding)

    def tp_memory(self, module: nn.Module) -> Any:
        """Each stage's parameter memory per tensor-parallel rank."""
        assert self.tp_plan is not None
        stages = [stage_parameters(module, self.plan, s) for s in range(self.plan.num_stages)]
        return self.tp_plan.memory_report(module, stages)


def plan_model(
    module: nn.Module, options: StrategyOptions, layout: ParallelLayout, microbatches: int, measure: Measure | None,
    call_order: list[str] | None = None, observe_flow: Any = None,
) -> ModelPlan:  # fmt: skip
    """The one planning function (``ModelParallel.setup`` and :func:`~lightning_mp.dry_run` both call it): the
    schedule, the stage plan and, with tp > 1, the tensor-parallel plan. Without measured costs, a "time" or
    "memory" balance falls back to "params". ``call_order``: the submodules in the order one observed step first
    called them, which places the modules outside the layers where they run; ``observe_flow``: what each layer is
    called with, which finds the tensors that cross stage boundaries beside the activation."""
    balance = options.balance
    if measure is None and balance in ("time", "memory"):
        balance = "params"
    schedule, v, measure, estimates = _resolve_schedule(module, options, layout, microbatches, measure)
    plan = _plan_stages(module, options, balance, layout, schedule, v, microbatches, measure, call_order, observe_flow)
    result = ModelPlan(plan, schedule, v, estimates=estimates, data_parallel_sharding=options.data_parallel_sharding)
    if layout.tp > 1:  # planned on the whole model, applied to each rank's stage once it holds memory
        result.tp_plan = plan_tensor_parallel(
            module, plan.layers.container_name, layout.tp, options.tensor_parallel_plan, options.sequence_parallel
        )
    return result


def prepare(
    trainer: Any, module: nn.Module, options: StrategyOptions, ctx: RankContext,
    to_device: Callable[[Any, torch.device], Any],
    precision_context: Callable[[], AbstractContextManager] = nullcontext,
) -> ParallelModel:  # fmt: skip
    """What ``ModelParallel.setup`` runs once: measure (when the plan needs it, under ``precision_context``), plan,
    print the plan on rank 0, and make this rank's part of the model. ``to_device(batch, device)`` moves a batch."""
    m = _microbatches(options, ctx.layout)
    wanted = options.schedule == "auto" or options.max_memory is not None
    probe = probe_model(trainer, module, options.balance, wanted, m, ctx.device, ctx.rank, to_device, precision_context)
    planned = plan_model(module, options, ctx.layout, m, probe.measure, probe.call_order, probe.observe_flow)
    if planned.tp_plan is not None:  # the data-flow planner, then the self-check unless off, before it is printed
        step, no_step = _check_step(trainer, module, m, to_device)
        mode = options.tensor_parallel_check
        self_check(module, planned.tp_plan, _tp_group(ctx), step, mode, ctx.device, no_step)
    rank_zero_info(planned.format(module, ctx.layout, m))
    return parallelize(module, planned, options, ctx)


def _check_step(
    trainer: Any, module: nn.Module, microbatches: int, to_device: Callable[[Any, torch.device], Any]
) -> tuple[Callable[[], Any] | None, str | None]:
    """The user's step on the first micro-batch of the trainer's data, on this rank, where the whole model is, for
    the tensor-parallel self-check (None and why when there is no batch)."""
    home = model_device(module)
    batch, problem = first_batch(trainer, lambda b: to_device(b, home))
    if batch is None:
        return None, f"no batch of data at set-up: {problem}"
    return step_on_first_microbatch(module, step_hook(trainer), batch, microbatches), None


def _tp_group(ctx: RankContext) -> TPGroup:
    return TPGroup(ctx.mesh["tp"].get_group(), ctx.layout.coords(ctx.rank)[2], ctx.layout.tp)


def parallelize(module: nn.Module, planned: ModelPlan, options: StrategyOptions, ctx: RankContext) -> ParallelModel:
    """Turn ``module`` (the whole model, on every rank) into this rank's part of ``planned``."""
    plan = planned.plan
    runtime = _split(module, plan, options, ctx)
    pp_group = ctx.mesh["pp"].get_group()
    runner = PipelineRunner(
        module, runtime, dist.get_process_group_ranks(pp_group), pp_group, planned.schedule,
        _microbatches(options, ctx.layout), ctx.device, p2p=ctx.p2p,
        monitor=options.pipeline_metrics and ctx.layout.pp > 1,  # one stage: no bubble, nothing to balance
        activation_checkpointing=options.activation_checkpointing, loss_normalization=options.loss_normalization,
    )  # fmt: skip
    runtime.checkpoint_every = options.checkpoint_every_n_layers
    result = ParallelModel(plan, runner, planned.schedule, planned.virtual_stages, planned.tp_plan)
    result.global_tokens = options.loss_normalization == "global_tokens"
    _materialize_stage(module, ctx.device)
    result.grads = _gradient_groups(module, runtime, ctx)
    if planned.tp_plan is not None:
        _apply_tensor_parallel(module, result, options, ctx)
    return result


def _microbatches(options: StrategyOptions, layout: ParallelLayout) -> int:
    return resolve_microbatches(options.microbatches, layout.pp)


def _resolve_schedule(
    module: nn.Module, options: StrategyOptions, layout: ParallelLayout, microbatches: int, measure: Measure | None,
) -> tuple[str, int, Measure | None, list[Any] | None]:  # fmt: skip
    """The schedule and stages per rank to run: ``schedule="auto"`` simulates each candidate on the measured costs
    when there are some (and hands the same costs on to the plan), else decides by the model's layers."""
    if options.schedule != "auto":
        return options.schedule, options.virtual_stages, measure, None
    if measure is None:
        schedule = choose_schedule(module, options.layers)
        rank_zero_info(f"lightning-mp: schedule='auto' runs {schedule!r} (no measured costs to compare)")
        return schedule, 1, None, None
    found = discover_layers(module, options.layers)
    costs = measure(found)
    chosen, estimates = choose_schedule_by_cost(
        module, found, costs, layout.pp, microbatches, options.max_memory,
        interleave=isinstance(options.balance, str),
    )  # fmt: skip
    table = ", ".join(f"{e.label} {e.step_time:.3g} s / {e.peak_memory / 2**20:.4g} MiB" for e in estimates)
    rank_zero_info(f"lightning-mp: schedule='auto' runs {chosen.label!r} (predicted per step: {table})")
    return chosen.schedule, chosen.virtual_stages, lambda _: costs, estimates


def _plan_stages(
    module: nn.Module, options: StrategyOptions, balance: Any, layout: ParallelLayout, schedule: str, v: int,
    microbatches: int, measure: Measure | None, call_order: list[str] | None = None, observe_flow: Any = None,
) -> StagePlan:  # fmt: skip
    """The stage plan: ``pp × v`` stages, placed on pipeline ranks by the schedule when ``v`` > 1."""
    try:
        plan = build_plan(
            module, layout.pp * v, balance, options.layers, measure, "1f1b" if v > 1 else schedule,
            microbatches, options.max_memory, call_order, observe_flow,
        )  # fmt: skip
    except ModelSplitError as err:
        if v == 1:
            raise
        raise ModelSplitError(
            f"{err} With virtual_stages={v} the layers are split into pipeline_parallel_size × virtual_stages ="
            f" {layout.pp * v} stages: lower virtual_stages (or pipeline_parallel_size)."
        ) from err
    if v > 1:  # its predictions assume one stage per rank
        plan.prediction = None
        plan.stage_ranks = stage_ranks(schedule, layout.pp, v)
    return plan


def _split(module: nn.Module, plan: StagePlan, options: StrategyOptions, ctx: RankContext) -> StageRuntime:
    """Rewrite ``module`` in place into this rank's (virtual) stages."""
    stage = ctx.layout.coords(ctx.rank)[1]
    placement = plan.stage_ranks or list(range(ctx.layout.pp))
    chunks = [k for k, rank in enumerate(placement) if rank == stage]
    runtime = StageRuntime(module, plan, stage, movable=options.rebalance, chunks=chunks)
    container = plan.layers.container_name + "."
    if options.rebalance and any(name.startswith(container) for name, _ in runtime.shared_params):
        raise ValueError(
            "rebalance=True cannot move layers that share parameters with other stages; use rebalance=False."
        )
    return runtime


def _materialize_stage(module: nn.Module, device: torch.device) -> None:
    """Give the stage's parameters built on the meta device (``configure_model`` or ``init_module(empty_init=
    True)``) memory on this device, initialized by each module's ``reset_parameters``: a rank never holds
    another stage's layers, so the model may be larger than one process."""
    if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        return
    try:
        _materialize_meta_tensors(module, device)
    except TypeError as err:
        raise ModelSplitError(
            f"{err} lightning-mp materializes the stage's meta-device parameters after the split, as Lightning's"
            " ModelParallelStrategy does: give that module a reset_parameters(), or build it on a real device."
        ) from err


def _gradient_groups(module: nn.Module, runtime: StageRuntime, ctx: RankContext) -> GradientSync:
    """The groups gradients are reduced over (created in the order ``runtime.groups`` documents): the replica's
    global norm, then the tied weights' stages."""
    layout = ctx.layout
    sync = GradientSync(norm_group=replica_groups(layout, ctx.rank))
    if layout.dp > 1:
        sync.dp_group = ctx.mesh["dp"].get_group()
    placement = runtime.plan.stage_ranks or list(range(layout.pp))
    shared = [(name, tuple(sorted({placement[s] for s in stages}))) for name, stages in runtime.shared_params]
    shared = [(name, positions) for name, positions in shared if len(positions) > 1]
    position_sets = sorted({positions for _, positions in shared})
    groups = shared_weight_groups(layout, ctx.rank, position_sets)
    by_name = dict(module.named_parameters())
    for positions in position_sets:
        if runtime.stage in positions:
            params = [by_name[n] for n, p in shared if p == positions and n in by_name]
            sync.shared.append((params, groups[positions]))
    sync.norm_skip = {id(by_name[n]) for n, positions in shared if n in by_name and positions[0] != runtime.stage}
    return sync


def _apply_tensor_parallel(
    module: nn.Module, result: ParallelModel, options: StrategyOptions, ctx: RankContext
) -> None:
    """Split this stage's planned layers over the tp group."""
    assert result.tp_plan is not None
    tp = _tp_group(ctx)
    tp_rank, tp_group = tp.rank, tp.group
    result.tensor = state = apply_tensor_parallel(module, result.tp_plan, tp)
    by_name = dict(module.named_parameters())
    result.grads.partial = [by_name[n] for n in state.partial_grads if n in by_name]
    result.grads.tp_group = tp_group
    if tp_rank > 0:  # a replicated parameter counts in the gradient norm once, on tp rank 0
        result.grads.norm_skip |= {id(p) for n, p in by_name.items() if n not in state.specs}
    if options.loss_parallel and state.has_head:
        result.runner.step_context = loss_parallel

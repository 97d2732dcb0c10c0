"""``ModelParallel``: the Lightning strategy that pipelines any LightningModule across ranks.

The strategy is thin: it sets up the processes and the (dp, pp, tp) mesh, splits the model with
:func:`~lightning_mp.pipeline.build_plan`, and routes Lightning's hooks to a
:class:`~lightning_mp.pipeline.PipelineRunner` (steps) and to :mod:`lightning_mp.grads` (gradients).
See docs/design.md for the data flow of one step.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.init import _materialize_meta_tensors
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.distributed_c10d import _get_default_store
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mp.checkpoint import (
    CheckpointError,
    Shards,
    is_checkpoint_dir,
    load_named_optimizer_state,
    load_stage_checkpoint,
    named_optimizer_state,
    save_checkpoint_dir,
)
from lightning_mp.comm import P2P, all_gather_objects, broadcast_object
from lightning_mp.discovery import discover_layers
from lightning_mp.errors import LayoutError, ModelSplitError
from lightning_mp.grads import GradStash, all_reduce_grads, clip_by_global_norm
from lightning_mp.hugging_face import hugging_face_models
from lightning_mp.launcher import HydraJobLauncher, hydra_multirun
from lightning_mp.layout import ParallelLayout, SizeSpec, parse_bytes
from lightning_mp.microbatch import batch_size_of
from lightning_mp.partition import BALANCE_CHOICES
from lightning_mp.pipeline import PipelineRunner
from lightning_mp.planning import (
    BalanceSpec,
    build_plan,
    choose_schedule,
    choose_schedule_by_cost,
    measure_step_costs,
)
from lightning_mp.profiling import LayerCosts, preserved_random_state
from lightning_mp.rebalance import move_layers
from lightning_mp.schedules import SCHEDULE_CHOICES, chunks_of, stage_ranks
from lightning_mp.stage import StagePlan, StageRuntime, is_placeholder, stage_parameters
from lightning_mp.tp_layers import TPGroup, gather_full
from lightning_mp.tp_plan import TensorParallelPlan, TensorParallelState, apply_tensor_parallel, plan_tensor_parallel
from lightning_mp.vocab_loss import loss_parallel
from lightning_mp.watchdog import FailureWatch

log = logging.getLogger(__name__)

_EVAL_HOOKS = {
    TrainerFn.VALIDATING: "validation_step",
    TrainerFn.TESTING: "test_step",
    TrainerFn.PREDICTING: "predict_step",
}


class ModelParallel(ParallelStrategy):
    """Pipeline (and, later, tensor) parallelism for an unmodified LightningModule.

    Args:
        pipeline_parallel_size: number of pipeline stages; "auto" = world size / (dp · tp).
        tensor_parallel_size: ranks sharing each layer's weights (Megatron-style tensor parallelism, planned
            automatically: see ``tp_plan``): attention and MLP projections split column- then row-wise, the token
            embedding and LM head over the vocabulary; everything else replicated.
        data_parallel_size: replicas of the whole pipeline, each fed its own shard of the data;
            "auto" = world size / (pp · tp), or 1 when pipeline_parallel_size is also "auto".
        microbatches: micro-batches per batch; "auto" = 2 × pipeline_parallel_size (fewer if the batch is smaller).
        schedule: "1f1b" (default: GPipe's bubble with at most pp micro-batches in flight), "gpipe" (all forwards,
            then all backwards), "interleaved_1f1b" (each rank runs ``virtual_stages`` smaller stages: the bubble
            shrinks by that factor, for more messages), "zero_bubble" (1F1B whose nn.Linear layers defer their weight
            gradients to fill the waits, as ZB-H1: a smaller bubble at 1F1B's memory), or "none" (the model is split
            but each batch flows through the stages whole); "auto" picks zero_bubble when the layers have nn.Linear
            weights to defer (and the precision is not mixed), else 1f1b.
        balance: "time" (default: equal forward+backward time, measured at set-up on one micro-batch of the
            data; "params" when no batch can be had), "uniform" layer counts, "params" (equal parameter counts),
            "memory" (equal predicted peak memory: parameters, gradients, Adam states, and the activations the
            schedule keeps in flight), or a list of layer counts per stage.
        layers: dotted name of the container of blocks to split (e.g. "model.transformer.h"); found automatically
            when None: the ``nn.ModuleList`` of same-class blocks or ``nn.Sequential`` holding the most parameters.
        process_group_backend: "gloo" on CPU and "nccl" on GPU by default.
        timeout: for collectives and point-to-point messages (a ``timedelta`` or seconds). A point-to-point wait
            longer than this ends every rank with a message naming the rank, stage, micro-batch, direction and
            peer. A rank that raises or dies ends the others within seconds whatever this is (see ``watchdog``).
        start_method: "popen" (re-run the script per rank, like DDP), "spawn" or "fork".
        pipeline_metrics: log each stage's busy time, waiting time and utilization and the bubble every training
            step (``pipeline/...``), and warn with a better ``balance`` when the stages are measurably imbalanced.
        rebalance: move layers between stages while training when the stages are measurably imbalanced
            (parameters, buffers and optimizer state move; the numbers stay those of an unmoved run).
        rebalance_every: measured steps between two rebalancing decisions, or "epoch": decide at each epoch boundary
            (before the first step of the next epoch, with the whole epoch measured).
        max_memory: bytes a stage may use ("24GiB", "500MB" or a number): "time" minimizes time among the splits
            that fit, and a plan predicted over it is refused with the number of stages that would fit.
        checkpoint_weights_only: load checkpoints without running code from them (tensors and plain data only);
            False for a checkpoint you trust whose saved hyper-parameters hold other Python objects.
        predictions: where ``trainer.predict`` returns the predictions (in batch order): "all" ranks, or "rank0",
            the first stage of each pipeline (global rank 0 and, with data parallelism, each replica's first
            stage); the other ranks get None, and only one message per batch leaves the last stage.
        activation_checkpointing: recompute each stage's layer activations in the backward instead of keeping them
            ("always"; "except_last": all micro-batches but the last, whose backward follows at once, as GPipe
            does): less memory per in-flight micro-batch for one more forward. The numbers do not change.
        checkpoint_every_n_layers: with activation checkpointing, recompute only every n-th layer of a stage (the
            first, the n+1-th, ...) and keep the others' activations: between the memory of "never" and "always".
        tensor_parallel_plan: with tensor_parallel_size > 1, styles that override the automatic plan: module name
            pattern (``*`` for any part) -> "colwise", "rowwise", "vocab" or "replicate",
            e.g. ``{"blocks.*.mlp.0": "colwise", "blocks.*.mlp.2": "rowwise"}``.
        loss_parallel: with tensor parallelism, the LM head hands the loss its logits sharded over the vocabulary
            (a DTensor) and cross-entropy runs vocabulary-parallel, never gathering them; False gathers the logits
            (for a step that does more with them than a loss and ``argmax``).
        virtual_stages: stages per rank for schedule="interleaved_1f1b" (default 2): the layers are split into
            pp × virtual_stages stages, rank r running stages r, r + pp, ...; 1 for every other schedule.
        sequence_parallel: with tensor parallelism, split the activations inside each block along the sequence
            between the split layers (norms, residuals, dropout each hold 1/tp of them: less activation memory, the
            same communication volume). Needs batch-first models whose blocks' projections are all split and
            sequence lengths divisible by tensor_parallel_size.

    Example:
        >>> trainer = L.Trainer(strategy=ModelParallel(pipeline_parallel_size=2, schedule="gpipe"), devices=2)
    """

    strategy_name = "model_parallel"

    def __init__(
        self,
        pipeline_parallel_size: SizeSpec = "auto",
        tensor_parallel_size: int = 1,
        data_parallel_size: SizeSpec = "auto",
        microbatches: Union[int, Literal["auto"]] = "auto",
        schedule: Literal["auto", "gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "none"] = "1f1b",
        balance: BalanceSpec = "time",
        layers: Optional[str] = None,
        accelerator: Any = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: Optional[str] = None,
        timeout: Union[timedelta, float, None] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
        pipeline_metrics: bool = True,
        rebalance: bool = False,
        rebalance_every: Union[int, Literal["epoch"]] = 50,
        max_memory: Union[int, float, str, None] = None,
        checkpoint_weights_only: bool = True,
        predictions: Literal["all", "rank0"] = "all",
        activation_checkpointing: Literal["never", "except_last", "always"] = "never",
        checkpoint_every_n_layers: int = 1,
        tensor_parallel_plan: Optional[dict[str, str]] = None,
        loss_parallel: bool = True,
        sequence_parallel: bool = False,
        virtual_stages: Optional[int] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.virtual_stages = _check_virtual_stages(virtual_stages, schedule, rebalance)
        _check_options(
            tensor_parallel_size,
            microbatches,
            schedule,
            balance,
            start_method,
            pipeline_parallel_size,
            self.virtual_stages,
        )
        self._pp_size = pipeline_parallel_size
        self._tp_size = tensor_parallel_size
        self._dp_size = data_parallel_size
        self._microbatches = microbatches
        self.schedule = schedule
        self.balance = balance if isinstance(balance, str) else list(balance)
        self.layers = layers
        self._process_group_backend = process_group_backend
        self._timeout = timedelta(seconds=timeout) if isinstance(timeout, (int, float)) else timeout
        self._start_method = start_method
        self.pipeline_metrics = pipeline_metrics
        self.rebalance = rebalance
        self.max_memory = parse_bytes(max_memory) if max_memory is not None else None
        self.rebalance_every = rebalance_every
        self.checkpoint_weights_only = checkpoint_weights_only
        if predictions not in ("all", "rank0"):
            raise ValueError(f"predictions={predictions!r} is invalid: choose 'all' or 'rank0'.")
        self.predictions = predictions
        if activation_checkpointing not in ("never", "except_last", "always"):
            raise ValueError(
                f"activation_checkpointing={activation_checkpointing!r} is invalid: use never, except_last or always."
            )
        self.activation_checkpointing = activation_checkpointing
        if isinstance(checkpoint_every_n_layers, bool) or not isinstance(checkpoint_every_n_layers, int):
            raise ValueError(f"checkpoint_every_n_layers={checkpoint_every_n_layers!r} is invalid: use a positive int.")
        if checkpoint_every_n_layers < 1:
            raise ValueError(f"checkpoint_every_n_layers={checkpoint_every_n_layers} is invalid: use a positive int.")
        self.checkpoint_every_n_layers = checkpoint_every_n_layers
        if tensor_parallel_plan is not None and not isinstance(tensor_parallel_plan, Mapping):
            raise ValueError(
                f"tensor_parallel_plan={tensor_parallel_plan!r} is invalid: give a mapping of module name pattern to"
                " 'colwise', 'rowwise', 'vocab' or 'replicate'."
            )
        self.tensor_parallel_plan = dict(tensor_parallel_plan) if tensor_parallel_plan else None
        self.loss_parallel = loss_parallel
        self.sequence_parallel = sequence_parallel
        if rebalance and isinstance(tensor_parallel_size, int) and tensor_parallel_size > 1:
            raise ValueError("rebalance=True does not move tensor-parallel layers yet: use rebalance=False with tp>1.")
        if rebalance_every != "epoch" and (
            isinstance(rebalance_every, bool) or not isinstance(rebalance_every, int) or rebalance_every < 1
        ):
            raise ValueError(
                f"rebalance_every={rebalance_every!r} is invalid: use a positive number of steps or 'epoch'."
            )
        if rebalance and not pipeline_metrics:
            raise ValueError("rebalance=True moves layers by the measured stage times: keep pipeline_metrics=True.")
        self.num_nodes = 1
        self._layout: Optional[ParallelLayout] = None
        self._mesh: Any = None
        self.plan: Optional[StagePlan] = None
        self._runner: Optional[PipelineRunner] = None
        self._stash = GradStash()
        self._watch: Optional[FailureWatch] = None
        self._failed = False  # this run raised (teardown then waits for no one)
        self._batch_checked = False
        self._shared_groups: list[tuple[list[torch.nn.Parameter], Any]] = []
        self._norm_skip: set[int] = set()  # tied copies counted on another stage, replicas on another tp rank
        self.tp_plan: Optional[TensorParallelPlan] = None
        self._tensor_parallel: Optional[TensorParallelState] = None
        self._norm_group: Any = None  # every stage and tp rank of this rank's pipeline replica

    # ---- properties ---------------------------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def layout(self) -> ParallelLayout:
        """The resolved (dp, pp, tp) sizes; available once the processes exist."""
        if self._layout is None:
            self._layout = ParallelLayout.resolve(
                self.num_nodes * self.num_processes, self._dp_size, self._pp_size, self._tp_size
            )
        return self._layout

    @property
    def device_mesh(self) -> Any:
        """The (dp, pp, tp) DeviceMesh."""
        if self._mesh is None:
            raise RuntimeError("The device mesh of ModelParallel exists only after the processes are set up.")
        return self._mesh

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.layout.coords(self.global_rank)[1]

    @property
    def is_distributed(self) -> bool:
        # Only data parallelism needs a distributed sampler: every stage of a pipeline must see the same batch.
        return self.layout.dp > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.layout.dp, "rank": self.layout.coords(self.global_rank)[0]}

    @property
    def microbatches(self) -> int:
        return 2 * self.layout.pp if self._microbatches == "auto" else int(self._microbatches)

    @property
    def stats(self) -> list[Any]:
        """Time accounting of this rank's stage (busy, wait, wall seconds) for each of the last 1000 steps."""
        return list(self._runner.history) if self._runner is not None else []

    # ---- processes ----------------------------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            if not self.cluster_environment.creates_processes_externally:
                self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._layout = None
        layout = self.layout  # validates the sizes before any process group exists
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
        self._start_failure_watch()
        self._mesh = layout.build_mesh(self.root_device.type)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._mesh

    def _start_failure_watch(self) -> None:
        self._failed = False
        if self._watch is not None:
            self._watch.stop()
        seconds = (self._timeout or default_pg_timeout).total_seconds()
        # gloo raises at the process-group timeout itself (with the P2P label); the watch is the backstop (NCCL)
        self._watch = FailureWatch(_get_default_store(), self.global_rank, self.describe_rank, seconds + 5.0)
        self._watch.start()

    def describe_rank(self, rank: int) -> str:
        """A global rank as messages name it: "rank 3 (stage 1)", with the data-parallel replica when dp > 1."""
        dp, pp, tp = self.layout.coords(rank)
        where = f"rank {rank} (stage {pp}" + (f", tp rank {tp}" if self.layout.tp > 1 else "")
        return where + (f", replica {dp})" if self.layout.dp > 1 else ")")

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    @property
    def process_group_backend(self) -> Optional[str]:
        return self._process_group_backend

    # ---- model set-up -------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if not module.automatic_optimization:
            raise NotImplementedError(
                "ModelParallel pipelines the backward pass itself and needs automatic optimization:"
                " set self.automatic_optimization = True (manual_backward cannot be split across stages)."
            )
        if self._runner is None:
            self._split_model(trainer, module)
            self._materialize_stage(module)
            self._apply_tensor_parallel(module)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._patch_gradient_clipping()
        self.barrier()
        if self._runner is not None:  # right after a barrier: the ranks' timelines share an origin
            self._runner.executor.time_origin = time.perf_counter()

    def _split_model(self, trainer: Any, module: Any) -> None:
        layout = self.layout
        balance, measure = self._measurement(trainer, module, wanted=self.schedule == "auto")
        if self.schedule == "auto":
            measure = self._choose_schedule(module, measure)
        v = self.virtual_stages
        schedule = "1f1b" if v > 1 else self.schedule  # (the cost model's in-flight micro-batches: 1F1B's)
        try:
            self.plan = build_plan(
                module, layout.pp * v, balance, self.layers, measure, schedule, self.microbatches, self.max_memory
            )
        except ModelSplitError as err:
            if v == 1:
                raise
            raise ModelSplitError(
                f"{err} With virtual_stages={v} the layers are split into pipeline_parallel_size × virtual_stages ="
                f" {layout.pp * v} stages: lower virtual_stages (or pipeline_parallel_size)."
            ) from err
        if v > 1:  # its predictions assume one stage per rank
            self.plan.prediction = None
            self.plan.stage_ranks = stage_ranks(self.schedule, layout.pp, v)
        tp_text = ""
        if layout.tp > 1:  # planned on the whole model, applied to this rank's stage once it holds memory
            self.tp_plan = plan_tensor_parallel(
                module, self.plan.layers.container_name, layout.tp, self.tensor_parallel_plan, self.sequence_parallel
            )
            stages = [stage_parameters(module, self.plan, s) for s in range(self.plan.num_stages)]
            memory = self.tp_plan.memory_report(module, stages)
            tp_text = "\n" + self.tp_plan.format() + "\n" + self.tp_plan.format_memory(memory)
        placement = self.plan.stage_ranks or list(range(layout.pp))
        chunks = [k for k, rank in enumerate(placement) if rank == self.stage]
        runtime = StageRuntime(module, self.plan, self.stage, movable=self.rebalance, chunks=chunks)
        container = self.plan.layers.container_name + "."
        if self.rebalance and any(name.startswith(container) for name, _ in runtime.shared_params):
            raise ValueError(
                "rebalance=True cannot move layers that share parameters with other stages; use rebalance=False."
            )
        rank_zero_info(
            self.plan.format() + tp_text + f"\n  layout: {layout}, schedule={self.schedule},"
            f" microbatches={1 if self.schedule == 'none' else self.microbatches}"
        )
        pp_mesh = self._mesh["pp"]
        self._runner = PipelineRunner(
            module,
            runtime,
            dist.get_process_group_ranks(pp_mesh.get_group()),
            pp_mesh.get_group(),
            self.schedule,
            self.microbatches,
            self.root_device,
            monitor=self.pipeline_metrics,
            p2p=P2P(self.root_device, watch=self._watch, describe=self.describe_rank),
            activation_checkpointing=self.activation_checkpointing,
        )
        runtime.checkpoint_every = self.checkpoint_every_n_layers
        self._setup_shared_parameters(module, runtime)

    def _choose_schedule(self, module: Any, measure: Optional[Callable[[Any], LayerCosts]]) -> Any:
        """Resolve ``schedule="auto"``: by simulating each candidate on the measured costs when there are some
        (returns a measure that hands the same costs to the plan), else by the model's layers."""
        mixed = isinstance(self.precision_plugin, MixedPrecision)
        if measure is None:
            self.schedule = choose_schedule(module, self.layers, mixed_precision=mixed)
            rank_zero_info(f"lightning-mp: schedule='auto' runs {self.schedule!r} (no measured costs to compare)")
            return None
        found = discover_layers(module, self.layers)
        costs = measure(found)
        chosen, estimates = choose_schedule_by_cost(
            module, found, costs, self.layout.pp, self.microbatches, self.max_memory, mixed,
            interleave=isinstance(self.balance, str),
        )  # fmt: skip
        self.schedule, self.virtual_stages = chosen.schedule, chosen.virtual_stages
        table = ", ".join(f"{e.schedule} {e.step_time:.3g} s / {e.peak_memory / 2**20:.4g} MiB" for e in estimates)
        rank_zero_info(f"lightning-mp: schedule='auto' runs {self.schedule!r} (predicted per step: {table})")
        return lambda _: costs

    def _materialize_stage(self, module: Any) -> None:
        """Give the stage's parameters built on the meta device (``configure_model`` or ``init_module(empty_init=
        True)``) memory on this device, initialized by each module's ``reset_parameters``: a rank never holds
        another stage's layers, so the model may be larger than one process."""
        if not any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
            return
        try:
            _materialize_meta_tensors(module, self.root_device)
        except TypeError as err:
            raise ModelSplitError(
                f"{err} lightning-mp materializes the stage's meta-device parameters after the split, as Lightning's"
                " ModelParallelStrategy does: give that module a reset_parameters(), or build it on a real device."
            ) from err

    def _apply_tensor_parallel(self, module: Any) -> None:
        """Split this stage's planned layers over the tp group; set up the groups gradients are reduced over."""
        layout = self.layout
        dp_rank, _, tp_rank = layout.coords(self.global_rank)
        groups = {}
        for d in range(layout.dp):  # every rank creates every group, in the same order
            ranks = [layout.rank_of(d, s, t) for s in range(layout.pp) for t in range(layout.tp)]
            groups[d] = dist.new_group(ranks) if len(ranks) > 1 else None
        self._norm_group = groups[dp_rank]
        if self.tp_plan is None:
            return
        tp_group = TPGroup(self._mesh["tp"].get_group(), tp_rank, layout.tp)
        self._tensor_parallel = apply_tensor_parallel(module, self.tp_plan, tp_group)
        if tp_rank > 0:  # a replicated parameter counts in the gradient norm once, on tp rank 0
            sharded = self._tensor_parallel.specs
            self._norm_skip |= {id(p) for n, p in module.named_parameters() if n not in sharded}
        if self.loss_parallel and self._tensor_parallel.has_head:
            assert self._runner is not None
            self._runner.step_context = loss_parallel

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        # empty_init: the model is built on the meta device; each rank materializes only its stage in setup()
        with torch.device("meta") if empty_init else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    def _measurement(
        self, trainer: Any, module: Any, wanted: bool = False
    ) -> tuple[Any, Optional[Callable[[Any], LayerCosts]]]:
        """The balance to use and, when it (or max_memory, or ``wanted``) needs measured costs, how to measure them.

        Global rank 0 measures the user's step on one micro-batch of the data the trainer is about to use, and
        every rank receives the same costs. Without a batch to measure (no dataloader yet, an empty one), a
        "time"/"memory" balance falls back to "params", with a warning that says why.
        """
        balance = self.balance
        if balance not in ("time", "memory") and self.max_memory is None and not wanted:
            return balance, None
        batch, problem = self._first_batch(trainer) if self.global_rank == 0 else (None, None)
        problem = broadcast_object(problem, 0, None, self.root_device)
        if problem is not None:
            rank_zero_warn(
                f"lightning-mp: balance={balance!r} measures the model on one batch of its data at set-up and could"
                f" not get one ({problem}); using balance='params' instead, and max_memory is not checked."
            )
            return ("params" if balance in ("time", "memory") else balance), None
        fitting = trainer.state.fn == TrainerFn.FITTING
        hook = "training_step" if fitting else _EVAL_HOOKS[trainer.state.fn]

        def measure(found: Any) -> LayerCosts:
            costs = None
            if self.global_rank == 0:
                if not any(p.is_meta for p in module.parameters()):  # a meta model is measured in FLOPs
                    module.to(self.root_device)
                costs = measure_step_costs(module, hook, batch, self.microbatches, backward=fitting)(found).as_dict()
            return LayerCosts(**broadcast_object(costs, 0, None, self.root_device))

        return balance, measure

    def _first_batch(self, trainer: Any) -> tuple[Any, Optional[str]]:
        """(the first batch of the current stage's dataloader, on this device; or None and what went wrong)."""
        loop = {
            TrainerFn.FITTING: trainer.fit_loop,
            TrainerFn.VALIDATING: trainer.validate_loop,
            TrainerFn.TESTING: trainer.test_loop,
            TrainerFn.PREDICTING: trainer.predict_loop,
        }[trainer.state.fn]
        try:
            loader = loop._data_source.dataloader()
            # taking a batch must not change what training sees: a shuffling sampler draws its order from these
            with preserved_random_state(*_generators_of(loader)):
                batch = next(iter(loader))
        except Exception as err:  # any failure of the user's dataloader hook means: no batch to measure
            return None, f"{type(err).__name__}: {err}"
        return self.batch_to_device(batch, self.root_device), None

    def _setup_shared_parameters(self, module: Any, runtime: StageRuntime) -> None:
        """Process groups for the weights used on several stages (tied embeddings), and who counts them in norms."""
        layout = self.layout
        dp_rank, _, tp_rank = layout.coords(self.global_rank)
        by_name = dict(module.named_parameters())

        placement = self.plan.stage_ranks or list(range(layout.pp))

        def ranks_of(stages: tuple[int, ...]) -> tuple[int, ...]:  # pipeline positions of (virtual) stages
            return tuple(sorted({placement[s] for s in stages}))

        shared = [(name, ranks_of(stages)) for name, stages in runtime.shared_params]
        shared = [(name, positions) for name, positions in shared if len(positions) > 1]
        stage_sets = sorted({stages for _, stages in shared})
        groups = {}
        for stages in stage_sets:  # every rank creates every group, in the same order
            for d in range(layout.dp):
                for t in range(layout.tp):
                    ranks = [layout.rank_of(d, s, t) for s in stages]
                    group = dist.new_group(ranks)
                    if (d, t) == (dp_rank, tp_rank):
                        groups[stages] = group
        self._shared_groups = []
        for stages in stage_sets:
            if self.stage in stages:
                params = [by_name[n] for n, s in shared if s == stages and n in by_name]
                self._shared_groups.append((params, groups[stages]))
        skip = {id(by_name[n]) for n, stages in shared if n in by_name and stages[0] != self.stage}
        self._norm_skip = skip

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ---- steps --------------------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._runner is not None and self.lightning_module is not None
        module = self.lightning_module
        accumulate = module.trainer.accumulate_grad_batches if module._trainer is not None else 1
        if not self._batch_checked:
            self._check_first_batch(args[0])
        self._stash.begin(p for p in module.parameters() if p.requires_grad)
        try:
            with self.precision_plugin.train_step_context():
                loss = self._runner.train_step("training_step", args[0], args[1:], 1.0 / accumulate)
        finally:
            self._stash.end()
        return loss

    def _check_first_batch(self, batch: Any) -> None:
        """An explicit ``microbatches`` above the (first, full) batch size is a configuration error; a short last
        batch later just gets fewer micro-batches. The same on every rank, before any message is sent."""
        self._batch_checked = True
        size = batch_size_of(batch)
        m = self._microbatches
        if isinstance(m, int) and self.schedule != "none" and size is not None and size < m:
            raise ValueError(
                f"microbatches={m} is larger than the batch of {size} samples: each micro-batch needs at least one"
                f" sample. Use microbatches<={size} (or 'auto'), or a batch size of at least {m}."
            )

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        # The pipeline already back-propagated inside training_step: hand its gradients over, run the hooks.
        self.pre_backward(closure_loss)
        assert self.lightning_module is not None
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self._stash.restore()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            result = closure()
            self._sync_gradients(optimizer)
            return result

        result = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        if self.rebalance_every != "epoch":
            self._maybe_rebalance(self.rebalance_every)
        return result

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.rebalance_every == "epoch" and batch_idx == 0 and self.lightning_module.trainer.current_epoch > 0:
            self._maybe_rebalance(1)  # no gradient is pending at an epoch's first batch: layers can move

    def _maybe_rebalance(self, min_steps: int) -> None:
        """With rebalance=True: after ``min_steps`` measured steps, move layers if the monitor advises it.

        The decision is global rank 0's (data-parallel replicas measure different times but must split alike).
        """
        runner = self._runner
        if not self.rebalance or runner is None or runner.monitor is None:
            return
        monitor = runner.monitor
        if monitor.steps < monitor.warmup + min_steps:
            return
        better = broadcast_object(monitor.suggestion(), 0, None, self.root_device)
        if better is not None:
            old = list(self.plan.balance)
            move_layers(runner.runtime, self.optimizers, better, runner.pp_ranks, self.root_device)
            if runner.executor.deferred is not None:  # adopted layers defer their weight gradients too
                runtime = runner.runtime
                runner.executor.deferred.install([runtime.plan.layers.layer(i) for i in runtime.own_layers])
            rank_zero_info(f"lightning-mp: rebalanced the pipeline from balance={old} to balance={better}")
        runner.reset_monitor()

    def _sync_gradients(self, optimizer: Any) -> None:
        """Sum tied weights' gradients over their stages, then average all gradients over the data-parallel replicas."""
        for params, group in self._shared_groups:
            all_reduce_grads(params, group, "sum")
        if self._tensor_parallel is not None and self._tensor_parallel.partial_grads:
            by_name = dict(self.lightning_module.named_parameters())
            partial = [by_name[n] for n in self._tensor_parallel.partial_grads if n in by_name]
            all_reduce_grads(partial, self._mesh["tp"].get_group(), "sum")
        if self.layout.dp > 1:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            all_reduce_grads(params, self._mesh["dp"].get_group(), "avg")

    def _patch_gradient_clipping(self) -> None:
        """Make ``gradient_clip_val`` clip by the norm over all stages, not each rank's own."""
        precision = self.precision_plugin
        if "clip_grad_by_norm" in vars(precision):
            return

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: Union[int, float]) -> None:
            params = list(precision.main_params(optimizer))
            group = self._norm_group
            counted = {id(p) for p in params} - self._norm_skip
            clip_by_global_norm(params, float(clip_val), group, counted)

        precision.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", args)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", args)

    def _eval_step(self, hook: str, args: tuple) -> Any:
        assert self._runner is not None
        ctx = (
            self.precision_plugin.val_step_context()
            if hook == "validation_step"
            else (self.precision_plugin.test_step_context())
        )
        with ctx:
            return self._runner.eval_step(hook, args[0], args[1:])

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._runner is not None
        with self.precision_plugin.predict_step_context():
            return self._runner.predict_step(args[0], args[1:], everywhere=self.predictions == "all")

    # ---- collectives --------------------------------------------------------------------------------------------
    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        container = [obj]
        dist.broadcast_object_list(container, src)
        return container[0]

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    def full_parameters(self) -> dict[str, Tensor]:
        """This stage's parameters by name, those split over the tp group gathered whole (a collective of it)."""
        assert self.lightning_module is not None
        state = self._tensor_parallel
        full = {}
        for name, param in self.lightning_module.named_parameters():
            if is_placeholder(name):
                continue
            spec = state.specs.get(name) if state is not None else None
            full[name] = gather_full(param.detach(), state.tp, spec) if spec is not None else param.detach().clone()
        return full

    # ---- checkpoints: distributed, in the model's own names (see checkpoint.py) ---------------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # each rank reads only its own stage, into the split model and its optimizers

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return {k: v for k, v in self.lightning_module.state_dict().items() if not is_placeholder(k)}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return named_optimizer_state(getattr(optimizer, "_optimizer", optimizer), self.lightning_module)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """A distributed checkpoint directory at ``filepath`` (see :mod:`lightning_mp.checkpoint`); every rank."""
        if storage_options is not None:
            raise TypeError("ModelParallel writes distributed checkpoints itself and takes no storage_options.")
        checkpoint = {**checkpoint, "lightning_mp": {"hf_models": hugging_face_models(self.lightning_module)}}
        save_checkpoint_dir(
            checkpoint, filepath, lambda obj: all_gather_objects(obj, None, self.root_device), self._shards()
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        trusted = not self.checkpoint_weights_only if weights_only is None else not weights_only
        if not is_checkpoint_dir(checkpoint_path):  # an ordinary one-file checkpoint (e.g. of one-process training)
            return self.checkpoint_io.load_checkpoint(checkpoint_path, weights_only=not trusted)
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        return load_stage_checkpoint(
            checkpoint_path, self.lightning_module, optimizers, weights_only=not trusted, shards=self._shards()
        )

    def _shards(self) -> Optional[Shards]:
        state = self._tensor_parallel
        if state is None:
            return None
        return Shards(state.specs, dist.get_process_group_ranks(state.tp.group))

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        local = module.state_dict()
        missing = [k for k in local if k not in state and not is_placeholder(k)]
        if strict and missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} entries of stage {self.stage}, e.g. {missing[:3]}: it was saved"
                " from another model (pass strict=False to load what matches)."
            )
        module.load_state_dict({k: v for k, v in state.items() if k in local}, strict=False)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            numbered = [p for g in saved.get("param_groups", []) for p in g["params"] if not isinstance(p, str)]
            if numbered:
                raise CheckpointError(
                    "this checkpoint's optimizer state numbers its parameters (a one-process checkpoint): it"
                    " cannot be matched to pipeline stages. Load its weights before fit"
                    " (model.load_state_dict(torch.load(path)['state_dict'])) and start the optimizer afresh."
                )
            load_named_optimizer_state(getattr(optimizer, "_optimizer", optimizer), self.lightning_module, saved)

    # ---- failure and teardown -----------------------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        # A rank that fails leaves its peers blocked in a receive: tell them (they end within seconds), name this
        # rank in its own traceback, and on the launching rank end the processes it started.
        self._failed = True
        if self._layout is not None and dist.is_initialized():
            me = self.describe_rank(self.global_rank)
            if hasattr(exception, "add_note"):
                exception.add_note(f"lightning-mp: raised on {me}")
            if self._watch is not None and not isinstance(exception, KeyboardInterrupt):
                summary = f"{type(exception).__name__}: {exception}".splitlines()[0][:500]
                self._watch.report(f"{me} failed: {summary}")
        if isinstance(self._launcher, _SubprocessScriptLauncher) and self.global_rank == 0:
            import signal

            self._launcher.kill(signal.SIGKILL)

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        if self._watch is not None:
            self._watch.stop(self.world_size, failed=self._failed)
            self._watch = None
        if hydra_multirun():  # the next job of the sweep starts its own processes and process group
            if dist.is_initialized():
                dist.destroy_process_group()
            if isinstance(self._launcher, HydraJobLauncher):
                self._launcher.restore_environment()
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Pipeline model parallelism (lightning-mp)")


def _check_virtual_stages(virtual_stages: Optional[int], schedule: str, rebalance: bool) -> int:
    """The stages per rank: 2 for zero_bubble_v, 2 by default for interleaved_1f1b, and only there more than 1."""
    fixed = chunks_of(schedule)
    if fixed is not None:
        if virtual_stages not in (None, fixed):
            raise ValueError(f"schedule={schedule!r} runs {fixed} stages per rank: leave virtual_stages unset.")
        if rebalance:
            raise ValueError("rebalance=True does not move the layers of virtual stages: use rebalance=False.")
        return fixed
    if virtual_stages is None:
        return 2 if schedule == "interleaved_1f1b" else 1
    if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise ValueError(f"virtual_stages={virtual_stages!r} is invalid: use a positive int (2 or more to interleave).")
    if virtual_stages > 1 and schedule != "interleaved_1f1b":
        raise ValueError(
            f"virtual_stages={virtual_stages} needs schedule='interleaved_1f1b' (schedule={schedule!r} runs one stage"
            " per rank): set both, or virtual_stages=1."
        )
    if virtual_stages > 1 and rebalance:
        raise ValueError("rebalance=True does not move the layers of virtual stages: use rebalance=False.")
    return virtual_stages


def _check_options(
    tensor_parallel_size: int,
    microbatches: Any,
    schedule: str,
    balance: Any,
    start_method: str,
    pipeline_parallel_size: Any,
    virtual_stages: int = 1,
) -> None:
    """What can be checked before any process starts: names, types, and a balance list against the stage count."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise LayoutError(f"tensor_parallel_size={tensor_parallel_size!r} is invalid: use a positive int.")
    if microbatches != "auto" and (
        isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1
    ):
        raise ValueError(f"microbatches={microbatches!r} is invalid: use a positive int or 'auto'.")
    if schedule not in SCHEDULE_CHOICES:
        raise ValueError(f"schedule={schedule!r} is not supported: choose one of {', '.join(SCHEDULE_CHOICES)}.")
    if isinstance(balance, str):
        if balance not in BALANCE_CHOICES:
            raise ValueError(
                f"balance={balance!r} is not supported: choose one of {', '.join(BALANCE_CHOICES)} or give a list of"
                " layer counts per stage, e.g. balance=[3, 3]."
            )
    elif not isinstance(balance, Sequence):
        raise ValueError(f"balance={balance!r} is invalid: use 'uniform', 'params' or a list of layer counts.")
    elif isinstance(pipeline_parallel_size, int) and len(balance) != pipeline_parallel_size * virtual_stages:
        per = f" × virtual_stages={virtual_stages}" if virtual_stages > 1 else ""
        raise ValueError(
            f"balance={list(balance)} has {len(balance)} entries but pipeline_parallel_size={pipeline_parallel_size}"
            f"{per}: give one layer count per stage."
        )
    if start_method not in ("popen", "spawn", "fork"):
        raise ValueError(f"start_method={start_method!r} is invalid: choose popen, spawn or fork.")


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

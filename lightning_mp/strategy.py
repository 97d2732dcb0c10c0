"""``ModelParallel``: the Lightning strategy that pipelines, and splits the layers of, any LightningModule.

A thin shell: each of Lightning's hooks delegates to one collaborator. Options are checked by
:mod:`lightning_mp.options`, process groups made by :mod:`lightning_mp.runtime`, the model split by
:func:`lightning_mp.parallelize.parallelize`, steps run by :class:`~lightning_mp.pipeline.runner.PipelineRunner`,
gradients synchronised by :class:`~lightning_mp.pipeline.grads.GradientSync`, checkpoints written by
:mod:`lightning_mp.checkpoint.strategy_io`. No algorithm lives here; docs/design.md shows one step's data flow.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_mp.checkpoint import strategy_io
from lightning_mp.observe.step_logs import silence_sync_dist_advice
from lightning_mp.observe.summary import use_split_model_callbacks
from lightning_mp.options import StrategyOptions, resolve_microbatches
from lightning_mp.parallelize import ParallelModel, RankContext, prepare
from lightning_mp.pipeline.loss_scaling import agree_on_overflow, loss_scaler_of
from lightning_mp.pipeline.microbatch import check_microbatches
from lightning_mp.pipeline.rebalance import maybe_rebalance
from lightning_mp.plan.build import BalanceSpec
from lightning_mp.runtime.host_memory import keep_freed_host_memory
from lightning_mp.runtime.launcher import HydraJobLauncher
from lightning_mp.runtime.layout import ParallelLayout, SizeSpec
from lightning_mp.runtime.messages import P2P, all_gather_objects
from lightning_mp.runtime.processes import join_process_group, leave_process_group, report_failure
from lightning_mp.runtime.watchdog import FailureWatch

ScheduleName = Literal["auto", "gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zero_bubble_v", "none"]


class ModelParallel(ParallelStrategy):
    """Pipeline and tensor parallelism for an unmodified LightningModule.

    Every argument is documented on :class:`~lightning_mp.options.StrategyOptions` (the Hydra config has the same
    keys, ``strategy.<name>=...``); the others are Lightning's own.

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
        schedule: ScheduleName = "1f1b",
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
        loss_normalization: Literal["auto", "samples", "global_tokens"] = "auto",
        tensor_parallel_check: Literal["error", "fallback", "off"] = "error",
        data_parallel_sharding: Literal["none", "optimizer", "gradients", "full"] = "none",
        data_parallel_bucket_size: Union[int, float, str] = "25MiB",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self.options = StrategyOptions(
            **{k: v for k, v in locals().items() if k in StrategyOptions.__dataclass_fields__}
        )
        self.num_nodes = 1
        self._layout: Optional[ParallelLayout] = None
        self._mesh: Any = None
        self._parallel: Optional[ParallelModel] = None
        self._watch: Optional[FailureWatch] = None
        self._messages_group: Any = None  # point-to-point messages' group (None: the default one)
        self._failed = False  # this run raised (teardown then waits for no one)
        self._batch_checked = False

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
            o = self.options
            world = self.num_nodes * self.num_processes
            self._layout = ParallelLayout.resolve(
                world, o.data_parallel_size, o.pipeline_parallel_size, o.tensor_parallel_size
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
    def schedule(self) -> str:
        """The schedule: as run once set up ("auto" resolved), as asked before."""
        return self._parallel.schedule if self._parallel is not None else self.options.schedule

    @property
    def virtual_stages(self) -> int:
        """Stages per rank: as run once set up, as asked (resolved) before."""
        return self._parallel.virtual_stages if self._parallel is not None else self.options.virtual_stages

    @property
    def balance(self) -> Any:
        return self.options.balance

    @property
    def plan(self) -> Any:
        """The stage plan (a :class:`~lightning_mp.plan.stage_plan.StagePlan`), once set up."""
        return self._parallel.plan if self._parallel is not None else None

    @property
    def tp_plan(self) -> Any:
        return self._parallel.tp_plan if self._parallel is not None else None

    @property
    def runner(self) -> Any:
        """The :class:`~lightning_mp.pipeline.runner.PipelineRunner` of this rank, once set up."""
        return self._parallel.runner if self._parallel is not None else None

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
        return resolve_microbatches(self.options.microbatches, self.layout.pp)

    @property
    def stats(self) -> list[Any]:
        """Time accounting of this rank's stage (busy, wait, wall seconds) for each of the last 1000 steps."""
        return list(self.runner.history) if self.runner is not None else []

    @property
    def process_group_backend(self) -> Optional[str]:
        return self.options.process_group_backend

    # ---- processes ----------------------------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.options.start_method != "popen":
            self._launcher = _MultiProcessingLauncher(self, start_method=self.options.start_method)
        elif not self.cluster_environment.creates_processes_externally:
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._layout = None
        layout = self.layout  # validates the sizes before any process group exists
        o, self._failed = self.options, False
        if self._watch is not None:
            self._watch.stop()
        o.process_group_backend, self._watch, self._messages_group = join_process_group(
            self.cluster_environment, self.root_device, o.process_group_backend, o.timeout, self.global_rank,
            self.describe_rank, self._end_launched_processes,
        )  # fmt: skip
        self._mesh = self.lightning_module._device_mesh = layout.build_mesh(self.root_device.type)
        if self.root_device.type == "cpu":  # tensors come from the C library's malloc: keep its memory (host_memory.py)
            keep_freed_host_memory()

    def describe_rank(self, rank: int) -> str:
        """A global rank as messages name it: "rank 3 (stage 1)", with the data-parallel replica when dp > 1."""
        return self.layout.describe(rank)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

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
        if self._parallel is None:
            p2p = P2P(self.root_device, group=self._messages_group, watch=self._watch, describe=self.describe_rank)
            ctx = RankContext(self.layout, self._mesh, self.global_rank, self.root_device, p2p)
            context = self.precision_plugin.forward_context
            self._parallel = prepare(trainer, module, self.options, ctx, self.batch_to_device, context)
        use_split_model_callbacks(trainer)  # a summary of the whole split model; a progress bar without "0/-2"
        if not self.is_distributed:  # no data parallelism: every rank logs the same values
            silence_sync_dist_advice()
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            o = self.options
            self._parallel.shard_data_parallel(
                module, self.optimizers, o.data_parallel_sharding, o.data_parallel_bucket_size
            )
        self.setup_precision_plugin()
        self._patch_gradient_clipping()
        scaler = loss_scaler_of(self.precision_plugin)  # fp16: every micro-batch's backward loss scaled
        self._parallel.runner.scale_loss = scaler.scale if scaler is not None else None
        self.barrier()
        self._parallel.runner.executor.time_origin = time.perf_counter()  # after a barrier: a shared origin

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        # empty_init: the model is built on the meta device; each rank materializes only its stage in setup()
        with torch.device("meta") if empty_init else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def _patch_gradient_clipping(self) -> None:
        """Make ``gradient_clip_val`` clip by the norm over all stages, not each rank's own."""
        precision = self.precision_plugin
        if "clip_grad_by_norm" not in vars(precision):
            clip = self._parallel.grads.clip
            precision.clip_grad_by_norm = lambda opt, val: clip(list(precision.main_params(opt)), float(val))

    # ---- steps --------------------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._parallel is not None and self.lightning_module is not None
        module = self.lightning_module
        if not self._batch_checked and self.schedule != "none":  # before any message is sent, on every rank
            check_microbatches(args[0], self.options.microbatches)
        self._batch_checked = True
        accumulate = module.trainer.accumulate_grad_batches if module._trainer is not None else 1
        with self.precision_plugin.train_step_context():
            return self._parallel.train_step(module, args[0], args[1:], accumulate)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        # The pipeline already back-propagated inside training_step: hand its gradients over, run the hooks.
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self._parallel.stash.restore()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_sync() -> Any:
            self._parallel.window_end = True  # its step's gradients may start reducing during its backward
            try:
                result = closure()
            finally:
                self._parallel.window_end = False
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self._parallel.grads.sync(params)
            if self._parallel.runner.scale_loss is not None:  # an inf on any rank skips the step on every rank
                agree_on_overflow(params, self.root_device)
            return result

        result = super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)
        if self._parallel.grads.sharding is not None:
            self._parallel.grads.sharding.after_optimizer_step()
        if self.options.rebalance and self.options.rebalance_every != "epoch":
            maybe_rebalance(self.runner, self.optimizers, self.options.rebalance_every, self.root_device)
        return result

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        epoch_boundary = batch_idx == 0 and self.lightning_module.trainer.current_epoch > 0
        if self.options.rebalance and self.options.rebalance_every == "epoch" and epoch_boundary:
            maybe_rebalance(self.runner, self.optimizers, 1, self.root_device)  # no gradient pending: layers can move

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context(), self._parallel.whole():
            return self.runner.eval_step("validation_step", args[0], args[1:])

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context(), self._parallel.whole():
            return self.runner.eval_step("test_step", args[0], args[1:])

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context(), self._parallel.whole():
            return self.runner.predict_step(args[0], args[1:], everywhere=self.options.predictions == "all")

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
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op) if isinstance(tensor, Tensor) else tensor

    def data_parallel_memory(self) -> Optional[dict[str, int]]:
        """Bytes this rank holds of parameters, gradients (after the reduction) and optimizer state under
        ``data_parallel_sharding`` (None without data parallelism or before training)."""
        sharding = self._parallel.grads.sharding if self._parallel is not None else None
        if sharding is None or not self.optimizers:
            return None
        return sharding.memory(strategy_io.unwrapped(self.optimizers[0]))

    def full_parameters(self) -> dict[str, Tensor]:
        """This stage's parameters by name, those split over the tp group gathered whole (a collective of it)."""
        return self._parallel.full_parameters(self.lightning_module)

    # ---- checkpoints: distributed, in the model's own names (see checkpoint/) -----------------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # each rank reads only its own stage, into the split model and its optimizers

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        grads = self._parallel.grads
        return strategy_io.model_state(self.lightning_module, grads.sharding, grads.norm_skip)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        grads = self._parallel.grads
        return strategy_io.optimizer_state(optimizer, self.lightning_module, grads.sharding, grads.norm_skip)

    def _checkpoint_shards(self) -> Any:
        return strategy_io.checkpoint_shards(self._parallel.shards(), self._parallel.grads.sharding)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("ModelParallel writes distributed checkpoints itself and takes no storage_options.")
        gather = lambda obj: all_gather_objects(obj, None, self.root_device)  # noqa: E731
        strategy_io.save(checkpoint, filepath, self.lightning_module, gather, self._checkpoint_shards())

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        trusted = not self.options.checkpoint_weights_only if weights_only is None else not weights_only
        return strategy_io.load(
            checkpoint_path, self.lightning_module, self.optimizers, trusted, self._checkpoint_shards(),
            self.checkpoint_io.load_checkpoint,
        )  # fmt: skip

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            strategy_io.remove(filepath)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        sharding = self._parallel.grads.sharding
        strategy_io.load_stage_model_state(self.lightning_module, checkpoint, strict, self.stage, sharding)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        sharding = self._parallel.grads.sharding
        strategy_io.load_optimizer_states(self.optimizers, checkpoint, self.lightning_module, sharding)

    # ---- failure and teardown -----------------------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        # A rank that fails leaves its peers blocked in a receive: tell them, and on the launching rank end the
        # processes it started.
        self._failed = True
        if self._layout is not None:
            report_failure(exception, self._watch, self.describe_rank(self.global_rank))
        self._end_launched_processes()

    def _end_launched_processes(self) -> None:
        """On the launching rank, kill the ranks it started (they would wait on it)."""
        if isinstance(self._launcher, _SubprocessScriptLauncher) and self.global_rank == 0:
            self._launcher.kill(signal.SIGKILL)

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        leave_process_group(self._watch, self.world_size, self._failed, self._launcher)
        self._watch = None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Pipeline model parallelism (lightning-mp)")

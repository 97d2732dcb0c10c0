"""The strategy's options and their rules, in one place: :class:`~lightning_mp.ModelParallel`'s constructor, the
Hydra config (``integrations.config``) and :func:`~lightning_mp.dry_run` check values here, before any process
starts. Every message names the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning_mp.pipeline.losses import LOSS_NORMALIZATIONS
from lightning_mp.pipeline.sharding import SHARDING_LEVELS
from lightning_mp.plan.partition import BALANCE_CHOICES, uniform_balance
from lightning_mp.plan.schedules import INTERLEAVABLE, SCHEDULE_CHOICES, chunks_of
from lightning_mp.runtime.errors import ConfigError, LayoutError
from lightning_mp.runtime.layout import parse_bytes
from lightning_mp.tensor.plan import USER_STYLES
from lightning_mp.tensor.self_check import CHECK_MODES


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_int_or(*words: str) -> Callable[[Any], bool]:
    return lambda v: _positive_int(v) or (isinstance(v, str) and v in words)


def _one_of(*choices: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str) and v in choices), " | ".join(choices)


def _balance_ok(v: Any) -> bool:
    if isinstance(v, str):
        return v in BALANCE_CHOICES
    return isinstance(v, Sequence) and bool(v) and all(_positive_int(c) or c == 0 for c in v)


def _bytes_ok(v: Any) -> bool:
    if v is None:
        return True
    try:
        return parse_bytes(v) > 0
    except (TypeError, ValueError):
        return False


def _plan_ok(v: Any) -> bool:
    return v is None or (isinstance(v, Mapping) and all(s in USER_STYLES for s in v.values()))


# key -> (is the value allowed, what is allowed[, the error type])
RULES: dict[str, tuple[Any, ...]] = {
    "pipeline_parallel_size": (_positive_int_or("auto"), "a positive int or auto", LayoutError),
    "tensor_parallel_size": (_positive_int, "a positive int", LayoutError),
    "data_parallel_size": (_positive_int_or("auto"), "a positive int or auto", LayoutError),
    "microbatches": (_positive_int_or("auto"), "a positive int or auto"),
    "schedule": _one_of(*SCHEDULE_CHOICES),
    "balance": (_balance_ok, " | ".join(BALANCE_CHOICES) + " | a list of layer counts per stage (positive ints)"),
    "start_method": _one_of("popen", "spawn", "fork"),
    "rebalance_every": (_positive_int_or("epoch"), "a positive int (steps) or epoch"),
    "max_memory": (_bytes_ok, 'null, a number of bytes, or a size such as "24GiB"'),
    "activation_checkpointing": _one_of("never", "except_last", "always"),
    "checkpoint_every_n_layers": (_positive_int, "a positive int"),
    "virtual_stages": (lambda v: v is None or _positive_int(v), "null or a positive int"),
    "predictions": _one_of("all", "rank0"),
    "loss_normalization": _one_of(*LOSS_NORMALIZATIONS),
    "timeout": (
        lambda v: v is None or hasattr(v, "total_seconds") or (isinstance(v, (int, float)) and v > 0),
        "seconds, > 0",
    ),
    "tensor_parallel_plan": (_plan_ok, "null or a mapping of module name pattern to " + " | ".join(USER_STYLES)),
    "tensor_parallel_check": _one_of(*CHECK_MODES),
    "data_parallel_sharding": _one_of(*SHARDING_LEVELS),
    "data_parallel_bucket_size": (
        lambda v: v is not None and _bytes_ok(v),
        'a number of bytes or a size such as "25MiB"',
    ),
}


def check_options(values: Mapping[str, Any], prefix: str = "") -> None:
    """Check the strategy settings in ``values`` (any subset of ``ModelParallel``'s arguments), each alone and then
    together.

    Raises:
        ConfigError: a value outside what its key allows, or settings that do not go together.
        LayoutError: a parallel size that is not a positive int (or "auto").
    """
    for key, value in values.items():
        rule = RULES.get(key)
        if key == "balance" and value == "manual":
            raise ConfigError(
                f"{prefix}balance=manual needs the layer counts per stage: add {prefix}balance=[n1,n2,...], one count"
                " per stage, summing to the model's layers (the stage plan printed at start-up, or"
                " lightning_mp.dry_run, shows how many)."
            )
        if rule is not None and not rule[0](value):
            error = rule[2] if len(rule) > 2 else ConfigError
            raise error(f"{prefix}{key}={value!r} is invalid: allowed: {rule[1]}.")
    _check_together(values, prefix)


def _check_together(values: Mapping[str, Any], prefix: str) -> None:
    schedule = values.get("schedule", "1f1b")
    rebalance = values.get("rebalance", False)
    v = resolve_virtual_stages(schedule, values.get("virtual_stages"), prefix)
    if rebalance and v > 1:
        raise ConfigError(f"{prefix}rebalance=True does not move the layers of virtual stages: use rebalance=False.")
    tp = values.get("tensor_parallel_size", 1)
    if rebalance and tp > 1:
        raise ConfigError(
            f"{prefix}rebalance=True does not move tensor-parallel layers yet: use rebalance=False with tp>1."
        )
    sharding = values.get("data_parallel_sharding", "none")
    if rebalance and sharding != "none":
        raise ConfigError(
            f"{prefix}rebalance=True does not move sharded optimizer state yet: use rebalance=False with"
            f" data_parallel_sharding={sharding!r} (or data_parallel_sharding='none')."
        )
    if rebalance and not values.get("pipeline_metrics", True):
        raise ConfigError(f"{prefix}rebalance=True moves layers by the measured stage times: keep pipeline_metrics.")
    balance, pp = values.get("balance", "time"), values.get("pipeline_parallel_size", "auto")
    if not isinstance(balance, str) and isinstance(pp, int) and len(balance) != pp * v:
        per = f" × virtual_stages={v}" if v > 1 else ""
        raise ConfigError(
            f"{prefix}balance={list(balance)} has {len(balance)} entries but pipeline_parallel_size={pp}{per}: give"
            " one layer count per stage."
        )
    if not isinstance(balance, str) and 0 in balance:
        even = uniform_balance(sum(balance), len(balance)) if sum(balance) >= len(balance) else None
        example = f", e.g. balance={even} if the model has {sum(balance)} layers" if even else ""
        raise ConfigError(
            f"{prefix}balance={list(balance)} gives stage {list(balance).index(0)} no layers: every stage needs at"
            f" least one layer{example}."
        )


def resolve_virtual_stages(schedule: str, virtual_stages: int | None, prefix: str = "") -> int:
    """Stages per rank: 2 for zero_bubble_v, 2 by default for interleaved_1f1b; more than 1 only there and for
    zero_bubble (interleaved zero bubble)."""
    fixed = chunks_of(schedule)
    if fixed is not None:
        if virtual_stages not in (None, fixed):
            raise ConfigError(
                f"{prefix}schedule={schedule!r} runs {fixed} stages per rank: leave virtual_stages unset."
            )
        return fixed
    if virtual_stages is None:
        return 2 if schedule == "interleaved_1f1b" else 1
    if virtual_stages > 1 and schedule not in INTERLEAVABLE:
        raise ConfigError(
            f"{prefix}virtual_stages={virtual_stages} needs schedule='interleaved_1f1b' or 'zero_bubble' (schedule="
            f"{schedule!r} runs one stage per rank): set both, or virtual_stages=1."
        )
    return virtual_stages


def resolve_microbatches(microbatches: int | str, pp: int, schedule: str = "1f1b") -> int:
    """Micro-batches per batch: "auto" is 2 per stage, 1 without a pipeline (pp = 1 or schedule="none")."""
    if schedule == "none":
        return 1
    if microbatches == "auto":
        return 1 if pp == 1 else 2 * pp  # without a pipeline nothing overlaps: one micro-batch
    return int(microbatches)


@dataclass
class StrategyOptions:
    """:class:`~lightning_mp.ModelParallel`'s arguments, each documented below; checked and normalised on creation."""

    pipeline_parallel_size: Any = "auto"
    """number of pipeline stages; "auto" = world size / (dp · tp)."""
    tensor_parallel_size: int = 1
    """ranks sharing each layer's weights (Megatron-style tensor parallelism, planned"""
    data_parallel_size: Any = "auto"
    """replicas of the whole pipeline, each fed its own shard of the data; "auto" = world size / (pp · tp), or 1 when
    pipeline_parallel_size is also "auto".
    """
    microbatches: Any = "auto"
    """micro-batches per batch; "auto" = 2 × pipeline_parallel_size, or 1 without a pipeline (pp = 1); fewer when the
    batch is smaller."""
    schedule: str = "1f1b"
    """"1f1b" (default: GPipe's bubble with at most pp micro-batches in flight), "gpipe" (all forwards, then all
    backwards), "interleaved_1f1b" (each rank runs ``virtual_stages`` smaller stages: the bubble shrinks by that
    factor, for more messages), "zero_bubble" (1F1B whose nn.Linear layers defer their weight gradients to fill the
    waits, as ZB-H1: a smaller bubble at 1F1B's memory; with ``virtual_stages`` > 1, interleaved zero bubble: the
    interleaved 1F1B order, its weight gradients deferred alike), "zero_bubble_v" (the V-shaped zero-bubble schedule:
    2 stages per rank, down the ranks and back up; rank 0 runs the first and the last stage), or "none" (the model is
    split but each batch flows through the stages whole). "auto" simulates every candidate on the measured layer
    costs and runs the fastest that fits the memory; without measured costs, zero_bubble when the layers have
    nn.Linear weights to defer, else 1f1b.
    """
    balance: Any = "time"
    """"time" (default: equal forward+backward time, measured at set-up on one micro-batch of the data; "params" when
    no batch can be had), "uniform" layer counts, "params" (equal parameter counts), "memory" (equal predicted peak
    memory: parameters, gradients, Adam states, and the activations the schedule keeps in flight), or a list of
    layer counts per stage.
    """
    layers: str | None = None
    """dotted name of the container of blocks to split (e.g. "model.transformer.h"); found automatically when None: the
    ``nn.ModuleList`` of same-class blocks or ``nn.Sequential`` holding the most parameters.
    """
    process_group_backend: str | None = None
    """"gloo" on CPU and "nccl" on GPU by default."""
    timeout: Any = None
    """for collectives and point-to-point messages (a ``timedelta`` or seconds). A point-to-point wait longer than this
    ends every rank with a message naming the rank, stage, micro-batch, direction and peer. A rank that raises or
    dies ends the others within seconds whatever this is (see ``watchdog``).
    """
    start_method: str = "popen"
    """"popen" (re-run the script per rank, like DDP), "spawn" or "fork"."""
    pipeline_metrics: bool = True
    """log each stage's busy time, waiting time and utilization and the bubble every training step (``pipeline/...``),
    and warn with a better ``balance`` when the stages are measurably imbalanced.
    """
    rebalance: bool = False
    """move layers between stages while training when the stages are measurably imbalanced (parameters, buffers and
    optimizer state move; the numbers stay those of an unmoved run).
    """
    rebalance_every: Any = 50
    """measured steps between two rebalancing decisions, or "epoch": decide at each epoch boundary (before the first
    step of the next epoch, with the whole epoch measured).
    """
    max_memory: Any = None
    """bytes a stage may use ("24GiB", "500MB" or a number): "time" minimizes time among the splits that fit, and a
    plan predicted over it is refused with the number of stages that would fit.
    """
    checkpoint_weights_only: bool = True
    """load checkpoints without running code from them (tensors and plain data only); False for a checkpoint you trust
    whose saved hyper-parameters hold other Python objects.
    """
    predictions: str = "all"
    """where ``trainer.predict`` returns the predictions (in batch order): "all" ranks, or "rank0", the first stage of
    each pipeline (global rank 0 and, with data parallelism, each replica's first stage); the other ranks get None,
    and only one message per batch leaves the last stage.
    """
    activation_checkpointing: str = "never"
    """recompute each stage's layer activations in the backward instead of keeping them ("always"; "except_last": all
    micro-batches but the last, whose backward follows at once, as GPipe does): less memory per in-flight micro-
    batch for one more forward. The numbers do not change.
    """
    checkpoint_every_n_layers: int = 1
    """with activation checkpointing, recompute only every n-th layer of a stage (the first, the n+1-th, ...) and keep
    the others' activations: between the memory of "never" and "always".
    """
    tensor_parallel_plan: dict[str, str] | None = None
    """with tensor_parallel_size > 1, styles that override the automatic plan: module name pattern (``*`` for any part)
    -> "colwise", "rowwise", "vocab" or "replicate", e.g. ``{"blocks.*.mlp.0": "colwise", "blocks.*.mlp.2":
    "rowwise"}``.
    """
    loss_parallel: bool = True
    """with tensor parallelism, the LM head hands the loss its logits sharded over the vocabulary (a DTensor) and
    cross-entropy runs vocabulary-parallel, never gathering them; False gathers the logits (for a step that does
    more with them than a loss and ``argmax``).
    """
    sequence_parallel: bool = False
    """with tensor parallelism, split the activations inside each block along the sequence between the split layers
    (norms, residuals, dropout each hold 1/tp of them: less activation memory, the same communication volume). Needs
    batch-first models whose blocks' projections are all split and sequence lengths divisible by
    tensor_parallel_size.
    """
    tensor_parallel_check: str = "error"
    """with tensor parallelism, before the first step each distinct split block (and the split embedding and LM head)
    runs once split and once whole on a real micro-batch, and outputs and gradients must agree: "error" refuses a
    plan that would train to different numbers (naming the module and the ``tensor_parallel_plan`` entry that keeps it
    whole), "fallback" keeps such a module whole with a warning, "off" skips the check.
    """
    virtual_stages: int | None = None
    """stages per rank for schedule="interleaved_1f1b" (default 2) or "zero_bubble" (default 1; more makes it
    interleaved zero bubble): the layers are split into pp × virtual_stages stages, rank r running stages r, r + pp,
    ...; 1 for every other schedule.
    """
    loss_normalization: str = "auto"
    """How micro-batch losses add up to the batch's. "auto": when the step returns the output of a mean-reduced
    loss (``F.cross_entropy``, ``nn.CrossEntropyLoss``, a Hugging Face model's loss, ``F.nll_loss``, mse/l1-style
    losses, ``Tensor.mean``), each micro-batch weighs in by the elements it averages (valid tokens, class weights),
    so the gradient and the loss are those of one process on the whole batch; otherwise by its samples, with a
    warning that says why. "samples": always by samples (Lightning's gradient accumulation). "global_tokens": as
    "auto", normalised by the valid tokens of all data-parallel replicas together (Hugging Face's
    ``average_tokens_across_devices``) rather than each replica's own (DDP's)."""
    data_parallel_sharding: str = "none"
    """What the data-parallel replicas of a stage split between them instead of each holding all of it (ZeRO):
    "none" (replicated: gradients averaged by all-reduce), "optimizer" (ZeRO-1: each replica keeps and updates the
    optimizer state of 1/dp of the stage's parameters; parameters re-assembled after the step), "gradients" (ZeRO-2:
    also gradients reduce-scattered, each replica keeping its 1/dp), "full" (ZeRO-3 / FSDP: parameters too, gathered
    for each step's micro-batches and released after it). Every level averages gradients in buckets launched during
    the last backward where it can, and trains to the same numbers; the user's optimizer is kept (rebuilt over the
    shards: element-wise optimizers such as SGD and AdamW match exactly). Only matters with data_parallel_size > 1."""
    data_parallel_bucket_size: Any = "25MiB"
    """bytes of gradients reduced together in one bucket (a number or a size such as "25MiB"): smaller buckets start
    reducing sooner during the backward, larger ones pay fewer collective latencies."""

    def __post_init__(self) -> None:
        check_options(vars(self))
        self.virtual_stages = resolve_virtual_stages(self.schedule, self.virtual_stages)
        self.balance = self.balance if isinstance(self.balance, str) else list(self.balance)
        self.max_memory = parse_bytes(self.max_memory) if self.max_memory is not None else None
        self.data_parallel_bucket_size = parse_bytes(self.data_parallel_bucket_size)
        self.tensor_parallel_plan = dict(self.tensor_parallel_plan) if self.tensor_parallel_plan else None
        if isinstance(self.timeout, (int, float)):
            self.timeout = timedelta(seconds=self.timeout)

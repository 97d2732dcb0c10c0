"""``ModelParallel`` as a Hydra structured config, registered on import as ``strategy/model_parallel``.

Any Hydra app can then put ``strategy: model_parallel`` in its defaults list (no YAML file of ours needed, so it
works from a wheel) and override every argument: ``strategy.pipeline_parallel_size=2 strategy.balance=[4,2]``.
OmegaConf rejects a misspelt key or a wrong scalar type when the config is composed; :func:`build_strategy` checks
the values that OmegaConf cannot type (``int`` or ``"auto"``, lists, choices) and names the key and the allowed
values, before any process starts::

    @hydra.main(config_path=None, config_name="app", version_base="1.3")
    def main(cfg):
        trainer = L.Trainer(strategy=lightning_mp.build_strategy(cfg.strategy), **cfg.trainer)
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

from lightning_mp.options import check_options
from lightning_mp.runtime.errors import ConfigError, ModelSplitError

__all__ = [
    "ConfigError",
    "ModelParallelConfig",
    "build_strategy",
    "check_strategy_config",
    "one_line_errors",
    "register_configs",
]

T = TypeVar("T")


@dataclass
class ModelParallelConfig:
    """The arguments of :class:`lightning_mp.ModelParallel` (see its docstring for the full meaning)."""

    _target_: str = "lightning_mp.ModelParallel"
    pipeline_parallel_size: Any = "auto"  # stages: a positive int or "auto" (= world size / (dp · tp))
    tensor_parallel_size: int = 1  # ranks sharing each layer's weights (Megatron-style, planned automatically)
    data_parallel_size: Any = "auto"  # pipeline replicas: a positive int or "auto"
    microbatches: Any = "auto"  # per batch: a positive int or "auto" (= 2 · pipeline_parallel_size)
    schedule: str = "1f1b"  # auto | gpipe | 1f1b | interleaved_1f1b | zero_bubble | zero_bubble_v | none
    virtual_stages: Optional[int] = None  # stages per rank for interleaved_1f1b or zero_bubble (None: 2, 1)
    balance: Any = "time"  # time | memory | params | uniform | a list of layer counts per stage
    layers: Optional[str] = None  # dotted path of the block container; None = found automatically
    process_group_backend: Optional[str] = None  # None = gloo on CPU, nccl on GPU
    timeout: float = 1800.0  # seconds a collective or point-to-point message may wait
    start_method: str = "popen"  # popen | spawn | fork
    pipeline_metrics: bool = True  # log per-stage utilization and bubble; advise a better balance
    rebalance: bool = False  # move layers between stages while training when they are imbalanced
    rebalance_every: Any = 50  # measured steps between rebalancing decisions (a positive int), or "epoch"
    max_memory: Any = None  # bytes per stage: a number or "24GiB"; None = no limit
    checkpoint_weights_only: bool = True  # load checkpoints without running code from them
    predictions: str = "all"  # where trainer.predict returns predictions: all | rank0
    activation_checkpointing: str = "never"  # recompute layer activations in backward: never | except_last | always
    checkpoint_every_n_layers: int = 1  # with checkpointing on: every n-th layer of a stage (1: all)
    # tp > 1: module name pattern -> colwise | rowwise | vocab | replicate, overriding the automatic plan
    tensor_parallel_plan: Optional[dict[str, str]] = None
    loss_parallel: bool = True  # tp > 1: cross-entropy over vocabulary-sharded logits (False: gather them)
    sequence_parallel: bool = False  # tp > 1: activations inside blocks split along the sequence between TP layers
    tensor_parallel_check: str = "error"  # tp > 1: split vs whole at set-up: error | fallback (keep whole) | off
    loss_normalization: str = "auto"  # micro-batch losses weighed by their tokens (auto), samples, or global_tokens
    data_parallel_sharding: str = "none"  # dp > 1: none | optimizer (ZeRO-1) | gradients (ZeRO-2) | full (ZeRO-3)
    data_parallel_bucket_size: Any = "25MiB"  # bytes of gradients per data-parallel reduction bucket


def check_strategy_config(cfg: Mapping[str, Any], prefix: str = "strategy") -> dict[str, Any]:
    """Return ``cfg`` as plain Python values, or raise :class:`ConfigError` naming the first bad key.

    Raises:
        ConfigError: an unknown key, or a value outside what the key allows ("strategy.schedule='zero' is invalid:
            allowed: auto | gpipe | 1f1b | zero_bubble | none").
    """
    values = _plain(cfg, prefix)
    known = set(ModelParallelConfig.__dataclass_fields__)
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}.{key} is not a ModelParallel setting; the settings are: {sorted(known)}.")
    check_options({k: v for k, v in values.items() if k != "_target_"}, prefix + ".")
    return values


def build_strategy(cfg: Mapping[str, Any], prefix: str = "strategy") -> Any:
    """Check ``cfg`` (a ``strategy`` config node) and build the :class:`~lightning_mp.ModelParallel` it describes."""
    from lightning_mp.strategy import ModelParallel

    values = check_strategy_config(cfg, prefix)
    values.pop("_target_", None)
    return ModelParallel(**values)


def one_line_errors(task: Callable[[Any], T]) -> Callable[[Any], T]:
    """Wrap a Hydra task function: a :class:`ConfigError` or :class:`ModelSplitError` (a setting or a model that
    cannot work) ends the run with one line on stderr and exit status 1; ``HYDRA_FULL_ERROR=1`` shows the traceback.

    Example:
        >>> @hydra.main(config_path="conf", config_name="app", version_base="1.3")
        ... @one_line_errors
        ... def main(cfg): ...
    """

    @functools.wraps(task)
    def run(cfg: Any) -> T:
        try:
            return task(cfg)
        except (ConfigError, ModelSplitError) as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {error} [HYDRA_FULL_ERROR=1 shows the traceback]", file=sys.stderr)
            raise SystemExit(1) from None

    return run


def register_configs() -> None:
    """Store ``ModelParallelConfig`` in Hydra's ConfigStore as ``strategy/model_parallel`` (when Hydra is there)."""
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError:  # Hydra is optional for the strategy itself
        return
    ConfigStore.instance().store(group="strategy", name="model_parallel", node=ModelParallelConfig)


def _plain(cfg: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
            if missing:
                raise ConfigError(
                    f"{prefix}.{missing[0]} needs a value (it is ??? in the config): set it on the command line."
                )
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)

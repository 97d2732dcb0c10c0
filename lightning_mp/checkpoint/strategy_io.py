"""The strategy's checkpoint hooks: what each rank saves and loads of its stage, in the model's own names."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_mp.checkpoint.distributed import (
    CheckpointError,
    Shards,
    is_checkpoint_dir,
    load_named_optimizer_state,
    load_stage_checkpoint,
    named_optimizer_state,
    save_checkpoint_dir,
)
from lightning_mp.checkpoint.dp_shards import (
    DataParallelShards,
    load_sharded_model_state,
    load_sharded_optimizer_state,
    sharded_optimizer_state,
    sharded_state_dict,
)
from lightning_mp.checkpoint.hugging_face import hugging_face_models
from lightning_mp.pipeline.sharding import DataParallelSharding
from lightning_mp.plan.stage_plan import is_placeholder

__all__ = ["load", "load_model_state", "load_optimizer_states", "named_optimizer_state", "remove", "save"]


def unwrapped(optimizer: Any) -> Optimizer:
    """The torch optimizer inside Lightning's wrapper."""
    return getattr(optimizer, "_optimizer", optimizer)


def stage_state_dict(module: nn.Module) -> dict[str, Any]:
    """This stage's model state (without the placeholder parameter of a stage that trains nothing)."""
    return {k: v for k, v in module.state_dict().items() if not is_placeholder(k)}


def save(
    checkpoint: dict[str, Any], filepath: Any, module: nn.Module, gather: Callable[[Any], list[Any]],
    shards: Any,
) -> None:  # fmt: skip
    """A distributed checkpoint directory at ``filepath`` (every rank); records the Hugging Face models inside."""
    checkpoint = {**checkpoint, "lightning_mp": {"hf_models": hugging_face_models(module)}}
    save_checkpoint_dir(checkpoint, filepath, gather, shards)


def load(
    path: Any, module: nn.Module, optimizers: Sequence[Any], trusted: bool, shards: Any,
    load_file: Callable[..., dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """This rank's stage of a distributed checkpoint; an ordinary one-file checkpoint through ``load_file``."""
    if not is_checkpoint_dir(path):  # e.g. of one-process training
        return load_file(path, weights_only=not trusted)
    return load_stage_checkpoint(
        path, module, [unwrapped(o) for o in optimizers], weights_only=not trusted, shards=shards
    )


def load_model_state(module: nn.Module, checkpoint: Any, strict: bool, stage: int, load: bool = True) -> None:
    """Load the entries of this stage; with ``strict``, every entry of the stage must be there (``load=False``:
    only check that)."""
    state = checkpoint["state_dict"]
    local = module.state_dict()
    missing = [k for k in local if k not in state and not is_placeholder(k)]
    if strict and missing:
        raise KeyError(
            f"the checkpoint lacks {len(missing)} entries of stage {stage}, e.g. {missing[:3]}: it was saved"
            " from another model (pass strict=False to load what matches)."
        )
    if load:
        module.load_state_dict({k: v for k, v in state.items() if k in local}, strict=False)


def load_optimizer_states(
    optimizers: Sequence[Any], checkpoint: Any, module: nn.Module, sharding: DataParallelSharding | None = None
) -> None:
    """Each optimizer's state by parameter name; refuses a one-process checkpoint's numbered state. With a sharded
    data-parallel stage, into this rank's shards."""
    for optimizer, saved in zip(optimizers, checkpoint["optimizer_states"]):
        numbered = [p for g in saved.get("param_groups", []) for p in g["params"] if not isinstance(p, str)]
        if numbered:
            raise CheckpointError(
                "this checkpoint's optimizer state numbers its parameters (a one-process checkpoint): it"
                " cannot be matched to pipeline stages. Load its weights before fit"
                " (model.load_state_dict(torch.load(path)['state_dict'])) and start the optimizer afresh."
            )
        if sharding is not None and sharding.level != "none":
            load_sharded_optimizer_state(unwrapped(optimizer), saved, sharding)
        else:
            load_named_optimizer_state(unwrapped(optimizer), module, saved)


def optimizer_state(optimizer: Any, module: nn.Module, sharding: DataParallelSharding | None, skip: set[int]) -> Any:
    """An optimizer's state by parameter name (a sharded stage's: this rank's runs of each state)."""
    if sharding is not None and sharding.level != "none":
        return sharded_optimizer_state(unwrapped(optimizer), sharding, skip)
    return named_optimizer_state(unwrapped(optimizer), module)


def model_state(module: nn.Module, sharding: DataParallelSharding | None, skip: set[int]) -> dict[str, Any]:
    """This stage's model state (at ``data_parallel_sharding="full"``: this rank's runs of each parameter)."""
    if sharding is not None:
        return sharded_state_dict(module, sharding, skip)
    return stage_state_dict(module)


def checkpoint_shards(tp: Shards | None, sharding: DataParallelSharding | None) -> Any:
    """How this rank's entries map to pieces of the full tensors: tensor-parallel slices, flat data-parallel runs."""
    if sharding is not None and sharding.level != "none":
        return DataParallelShards(sharding, tp)
    return tp


def load_stage_model_state(
    module: nn.Module, checkpoint: Any, strict: bool, stage: int, sharding: DataParallelSharding | None
) -> None:
    """:func:`load_model_state`, into the shards of a sharded data-parallel stage too."""
    if sharding is None:
        load_model_state(module, checkpoint, strict, stage)
        return
    load_model_state(module, checkpoint, strict, stage, load=False)
    load_sharded_model_state(module, checkpoint["state_dict"], sharding)


def remove(filepath: Any) -> None:
    """Delete a checkpoint directory or file."""
    path = Path(filepath)
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

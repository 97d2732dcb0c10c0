"""Distributed checkpoints in the model's own names: every rank writes its own stage, any layout reads them back.

A checkpoint is a directory:

- the tensors, written with ``torch.distributed.checkpoint`` (DCP) by every rank in parallel, each rank its own
  stage: ``model/<parameter or buffer name>`` and ``optim/<i>/<parameter name>/<state key>``, the names and full
  shapes of the unsplit model, so a checkpoint saved at one layout loads at any other (DCP matches by name and
  reads the overlapping pieces; replicas of a tensor are written once). A tensor-parallel rank writes its shard as
  the pieces of the full tensor it holds (a fused q/k/v projection: one piece per part);
- ``lightning_state.pt``: everything else Lightning saves (loops, callbacks, schedulers, hyper-parameters), the
  optimizers' parameter groups with parameter names, and what lightning-mp needs to export Hugging Face models.

Saving is atomic: the directory is written as ``<name>.partial`` and renamed only when complete, so a crash while
saving leaves the previous checkpoint intact and nothing a resume would pick up. Loading never runs code from the
checkpoint: DCP's metadata is read with an unpickler that accepts only its own data classes, and
``lightning_state.pt`` with ``torch.load(weights_only=True)``, unless the caller trusts the checkpoint.

:func:`load_full_checkpoint` turns a checkpoint back into one ordinary Lightning checkpoint dict in one process
(for ``LightningModule.load_state_dict``, a plain ``Trainer``, or :mod:`lightning_mp.checkpoint.consolidate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.optim import Optimizer

from lightning_mp.plan.stage_plan import is_placeholder
from lightning_mp.tensor.shard import ShardSpec

STATE_FILE = "lightning_state.pt"
PARTIAL_SUFFIX = ".partial"
MODEL = "model/"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, from elsewhere, or holding code to run."""


# ---- the Lightning checkpoint dict <-> tensors + the rest ---------------------------------------------------------


def split_checkpoint(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the tensors DCP writes, the rest) of a Lightning checkpoint whose optimizer states are keyed by name."""
    tensors = {MODEL + k: v.detach() for k, v in checkpoint.get("state_dict", {}).items() if isinstance(v, Tensor)}
    rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    rest["optimizer_states"] = []
    for i, named in enumerate(checkpoint.get("optimizer_states", [])):
        other: dict[str, dict[str, Any]] = {}  # non-tensor per-parameter state (rare: most optimizers use tensors)
        for param, state in named["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{i}/{param}/{key}"] = value.detach()
                else:
                    other.setdefault(param, {})[key] = value
        rest["optimizer_states"].append({"state": other, "param_groups": named["param_groups"]})
    return tensors, rest


def join_checkpoint(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_checkpoint`: a Lightning checkpoint dict with named optimizer states."""
    checkpoint = {k: v for k, v in rest.items() if k != "optimizer_states"}
    checkpoint["state_dict"] = {k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)}
    checkpoint["optimizer_states"] = []
    for i, saved in enumerate(rest.get("optimizer_states", [])):
        state: dict[str, dict[str, Any]] = {p: dict(s) for p, s in saved["state"].items()}
        prefix = f"optim/{i}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                param, _, name = key[len(prefix) :].rpartition("/")
                state.setdefault(param, {})[name] = value
        checkpoint["optimizer_states"].append({"state": state, "param_groups": saved["param_groups"]})
    return checkpoint


# ---- saving -------------------------------------------------------------------------------------------------------


def save_checkpoint_dir(
    checkpoint: dict[str, Any],
    path: str | Path,
    gather: Callable[[Any], list[Any] | None],
    shards: Any = None,  # Shards, or checkpoint.dp_shards.DataParallelShards
) -> None:
    """Write ``checkpoint`` (this rank's part) as the checkpoint directory ``path``; a collective of every rank.

    Args:
        checkpoint: this rank's Lightning checkpoint dict, its state dict and named optimizer states local.
        path: the directory to (re)place.
        gather: every rank's object as a list on global rank 0 (None elsewhere), for the optimizers' groups.
        shards: the parameters this rank holds in part (tensor parallelism), and their group.
    """
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    tensors, rest = split_checkpoint(checkpoint)
    if shards is not None:
        tensors = {k: shards.to_sharded(k, v) for k, v in tensors.items()}
    parts = gather(rest["optimizer_states"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that crashed
    if dist.is_initialized():
        dist.barrier()
    write_tensors(tensors, partial)
    if rank == 0:
        rest["optimizer_states"] = [merge_optimizer_states(list(group)) for group in zip(*(parts or [[]]))]
        rest["lightning_mp"] = {**rest.get("lightning_mp", {}), "format": FORMAT_VERSION}
        torch.save(rest, partial / STATE_FILE)
        _replace(partial, path)
    if dist.is_initialized():
        dist.barrier()


def write_tensors(tensors: dict[str, Tensor], directory: Path) -> None:
    """DCP-save ``tensors`` (every rank its own; names shared by ranks are written once) into ``directory``."""
    with _one_process_quietly():
        dcp.save(tensors, storage_writer=FileSystemWriter(directory), no_dist=not dist.is_initialized())


def _replace(partial: Path, path: Path) -> None:
    """Put the complete ``partial`` directory at ``path``; the previous checkpoint is removed only afterwards."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def merge_optimizer_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One named optimizer state from the stages' parts (same groups, each holding its own parameters)."""
    merged: dict[str, Any] = {"state": {}, "param_groups": []}
    for part in parts:
        merged["state"].update(part["state"])
        for i, group in enumerate(part["param_groups"]):
            if i == len(merged["param_groups"]):
                merged["param_groups"].append({**group, "params": []})
            known = merged["param_groups"][i]["params"]
            known += [p for p in group["params"] if p not in known]
    return merged


class Shards:
    """Tensor-parallel parameters in checkpoints: this rank's part of a full tensor, as DCP pieces and back.

    Args:
        specs: parameter name -> :class:`~lightning_mp.tensor.layers.ShardSpec` of the part this rank holds.
        group_ranks: the global ranks of the tensor-parallel group, by tp rank.
    """

    def __init__(self, specs: dict[str, ShardSpec], group_ranks: list[int]) -> None:
        self.specs = specs
        self.group_ranks = group_ranks

    def spec_of(self, key: str) -> ShardSpec | None:
        """The spec of a checkpoint entry: a split parameter, or an optimizer state shaped like one."""
        if key.startswith(MODEL):
            return self.specs.get(key[len(MODEL) :])
        if key.startswith("optim/"):
            return self.specs.get(key.split("/", 2)[2].rpartition("/")[0])
        return None

    def to_sharded(self, key: str, local: Tensor) -> Tensor:
        """``local`` as the pieces of the full tensor (a ShardedTensor); other entries unchanged."""
        spec = self.spec_of(key)
        if spec is None or local.dim() <= spec.dim or local.shape[spec.dim] != spec.local_size:
            return local
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

        def pieces(rank: int) -> list[tuple[list[int], list[int], int]]:  # (offsets, sizes, local offset)
            out, at = [], 0
            for offset, length in dataclasses.replace(spec, rank=rank).slices():
                if length:
                    offsets = [0] * local.dim()
                    offsets[spec.dim] = offset
                    sizes = list(local.shape)
                    sizes[spec.dim] = length
                    out.append((offsets, sizes, at))
                at += length
            return out

        device = local.device
        every = [
            ShardMetadata(offsets, sizes, f"rank:{global_rank}/{device}")
            for rank, global_rank in enumerate(self.group_ranks)
            for offsets, sizes, _ in pieces(rank)
        ]
        views = [
            (local.narrow(spec.dim, at, sizes[spec.dim]), offsets, sizes) for offsets, sizes, at in pieces(spec.rank)
        ]
        # DCP reads and writes contiguous pieces: a piece along a later dim (Conv1D's columns) is a copy
        back = [(view, view.contiguous()) for view, _, _ in views]
        mine = [
            Shard(piece, ShardMetadata(offsets, sizes, f"rank:{dist.get_rank()}/{device}"))
            for (_, piece), (_, offsets, sizes) in zip(back, views)
        ]
        metadata = ShardedTensorMetadata(
            every, spec.full_shape(local.shape), TensorProperties.create_from_tensor(local)
        )
        sharded = ShardedTensor._init_from_local_shards_and_global_metadata(mine, metadata)
        sharded._lmp_local = local, back  # type: ignore[attr-defined]  # where a load's pieces go back to
        return sharded

    def local_empty(self, key: str, full: Tensor) -> Tensor:
        """An empty tensor of this rank's part of ``full`` (the saved full shape), or ``full`` itself."""
        spec = self.spec_of(key)
        if spec is None or full.dim() <= spec.dim or full.shape[spec.dim] != spec.full_size:
            return full
        shape = list(full.shape)
        shape[spec.dim] = spec.local_size
        return torch.empty(shape, dtype=full.dtype, device=full.device)

    @staticmethod
    def to_local(value: Tensor) -> Tensor:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        if not isinstance(value, ShardedTensor):
            return value
        local, back = value._lmp_local  # type: ignore[attr-defined]
        for view, piece in back:
            if piece.data_ptr() != view.data_ptr():
                view.copy_(piece)
        return local  # type: ignore[no-any-return]


# ---- loading ------------------------------------------------------------------------------------------------------


def is_checkpoint_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / STATE_FILE).exists()


def read_metadata(path: str | Path) -> Metadata:
    """DCP's metadata of the checkpoint at ``path``, read without running code from it."""
    return _SafeReader(path).read_metadata()


def read_rest(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The non-tensor part of a checkpoint (``weights_only=False`` only for checkpoints you trust).

    Raises:
        CheckpointError: not a complete checkpoint, or one holding Python objects while ``weights_only``.
    """
    path = Path(path)
    if not is_checkpoint_dir(path):
        hint = " (a save was interrupted)" if path.name.endswith(PARTIAL_SUFFIX) else ""
        raise CheckpointError(
            f"{path} is not a complete lightning-mp checkpoint directory{hint}: {STATE_FILE} missing."
        )
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path / STATE_FILE} holds Python objects besides tensors and plain data (often in the saved"
            f" hyper-parameters), and loading them could run code: {err}. If you trust this checkpoint, pass"
            " ModelParallel(checkpoint_weights_only=False) (or weights_only=False to load_full_checkpoint)."
        ) from err


def load_tensors(path: str | Path, targets: dict[str, Tensor], local: bool = False) -> None:
    """Fill ``targets`` (name -> tensor of the saved shape) from the checkpoint; a collective unless ``local``."""
    with _one_process_quietly():
        dcp.load(targets, storage_reader=_SafeReader(path), no_dist=local or not dist.is_initialized())


def saved_tensor_shapes(metadata: Metadata) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {
        k: (m.size, m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def load_stage_checkpoint(
    path: str | Path,
    module: nn.Module,
    optimizers: list[Optimizer],
    weights_only: bool = True,
    shards: Any = None,  # Shards, or checkpoint.dp_shards.DataParallelShards
) -> dict[str, Any]:
    """This stage's part of a checkpoint (any saved layout), as a Lightning checkpoint dict; a collective.

    The model entries are those of ``module`` (the local stage); the optimizer entries those of its parameters;
    with ``shards``, the parts of the split parameters (and their optimizer states) this rank holds.
    """
    rest = read_rest(path, weights_only)
    shapes = saved_tensor_shapes(read_metadata(path))
    device = next((t.device for t in module.state_dict().values()), torch.device("cpu"))
    wanted = [MODEL + k for k in module.state_dict() if not is_placeholder(k)]
    names = [n for n, _ in module.named_parameters() if not is_placeholder(n)]
    for i in range(len(optimizers)):
        wanted += [
            k for k in shapes if k.startswith(f"optim/{i}/") and k[len(f"optim/{i}/") :].rpartition("/")[0] in names
        ]
    targets = {k: torch.empty(shapes[k][0], dtype=shapes[k][1], device=device) for k in wanted if k in shapes}
    if shards is not None:
        targets = {k: shards.to_sharded(k, shards.local_empty(k, v)) for k, v in targets.items()}
    load_tensors(path, targets)
    if shards is not None:
        targets = {k: shards.to_local(v) for k, v in targets.items()}
    return join_checkpoint(targets, rest)


def load_full_checkpoint(path: str | Path, weights_only: bool = True, indexed: bool = True) -> dict[str, Any]:
    """The whole checkpoint in this process, as one ordinary Lightning checkpoint dict (no process group needed).

    With ``indexed`` the optimizer states are numbered as ``torch.optim`` expects, parameters in the order the
    groups list them (the order of ``configure_optimizers`` when its parameters follow the model's layers, as with
    ``self.parameters()``); otherwise they stay keyed by parameter name.
    """
    rest = read_rest(path, weights_only)
    targets = {
        k: torch.empty(size, dtype=dtype) for k, (size, dtype) in saved_tensor_shapes(read_metadata(path)).items()
    }
    load_tensors(path, targets, local=True)
    checkpoint = join_checkpoint(targets, rest)
    if indexed:
        checkpoint["optimizer_states"] = [to_indexed(s) for s in checkpoint["optimizer_states"]]
    return checkpoint


def to_indexed(named: dict[str, Any]) -> dict[str, Any]:
    """A named optimizer state as ``Optimizer.load_state_dict`` takes it (parameters numbered in group order)."""
    order = [p for group in named["param_groups"] for p in group["params"]]
    index = {p: i for i, p in enumerate(order)}
    return {
        "state": {index[p]: s for p, s in named["state"].items() if p in index},
        "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in named["param_groups"]],
    }


# ---- optimizer states by parameter name ---------------------------------------------------------------------------


def named_optimizer_state(optimizer: Optimizer, module: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named instead of numbered."""
    names = {id(p): n for n, p in module.named_parameters()}
    state = optimizer.state_dict()
    ordered = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {ordered[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def check_same_groups(optimizer: Optimizer, named: dict[str, Any]) -> None:
    """Raise ValueError when the saved optimizer has another number of parameter groups than ``optimizer``."""
    if len(named["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(named['param_groups'])} parameter groups, this one"
            f" {len(optimizer.param_groups)}: configure_optimizers must build the same groups to resume."
        )


def load_named_optimizer_state(optimizer: Optimizer, module: nn.Module, named: dict[str, Any]) -> None:
    """Load the entries of a named optimizer state that belong to this stage's ``optimizer``.

    Raises:
        ValueError: the saved optimizer has other parameter groups than this one.
    """
    check_same_groups(optimizer, named)
    names = {id(p): n for n, p in module.named_parameters()}
    local_names = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(local_names)}
    groups = [
        {**{k: v for k, v in saved.items() if k != "params"}, "params": [index[names[id(p)]] for p in group["params"]]}
        for group, saved in zip(optimizer.param_groups, named["param_groups"])
    ]
    state = {index[n]: s for n, s in named["state"].items() if n in index}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---- reading DCP metadata safely ----------------------------------------------------------------------------------

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem", "pathlib")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata: its data classes, sizes, dtypes and paths; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _SAFE_MODULES or (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"the checkpoint's DCP metadata refers to {module}.{name}, which is not checkpoint data.")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        data = (Path(self.path) / name).read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/{name} is not DCP metadata.")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

"""The vocabulary-parallel loss: an LM head's logits stay split over the vocabulary for the cross-entropy.

Under :class:`loss_parallel` (on for every step when tensor parallelism splits an LM head) the head returns
:class:`ShardedLogits`: a tensor of the full logits' shape that holds only this rank's slice of the vocabulary. The
user's code runs unmodified on it:

- ``F.cross_entropy`` (and so ``nn.CrossEntropyLoss`` and Hugging Face's losses) runs vocabulary-parallel through
  PyTorch's own ``loss_parallel`` (max, sum of exponentials and target logit all-reduced over the ranks): the full
  logits never exist on any rank, and the loss comes back a plain tensor;
- casts and reshapes that keep the vocabulary as the last dim (``float()``, ``view(-1, V)``, ``logits[:, :-1]``...)
  stay split;
- anything else (``argmax``, ``softmax``, a metric) sees the full logits, gathered once (a collective of the tp
  group, which runs the same code) and differentiably, so it is right, only without the memory saving.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from lightning_mp.tensor.shard import ShardSpec, TPGroup, gather_logits

_loss_parallel_depth = [0]


def loss_parallel_active() -> bool:
    return _loss_parallel_depth[0] > 0


class loss_parallel:
    """Within: LM heads return :class:`ShardedLogits`. The backward of a loss computed within must run within too
    (PyTorch's ``loss_parallel`` handles the DTensor cross-entropy's backward)."""

    def __enter__(self) -> None:
        from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

        self._torch = torch_loss_parallel()
        self._torch.__enter__()
        _loss_parallel_depth[0] += 1

    def __exit__(self, *exc: Any) -> None:
        _loss_parallel_depth[0] -= 1
        self._torch.__exit__(*exc)


_SPLIT_KEEPING = {Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.contiguous}
_RESHAPES = {Tensor.view, Tensor.reshape}
_METADATA = {
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.requires_grad.__get__, Tensor.is_cuda.__get__, Tensor.layout.__get__,  # type: ignore[attr-defined]
}  # fmt: skip


class ShardedLogits(Tensor):
    """Logits of the full shape whose last dim (the vocabulary) this rank holds only its slice of; see the module
    docstring for what stays split and what is gathered."""

    _local: Tensor
    _tp: TPGroup
    _spec: ShardSpec
    _full: Tensor | None

    @staticmethod
    def __new__(cls, local: Tensor, tp: TPGroup, spec: ShardSpec) -> ShardedLogits:
        shape = (*local.shape[:-1], spec.full_size)
        self = Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, shape, dtype=local.dtype, device=local.device, requires_grad=local.requires_grad
        )
        self._local, self._tp, self._spec, self._full = local, tp, spec, None
        return self  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"ShardedLogits(shape={tuple(self.shape)}, local={tuple(self._local.shape)}, tp rank {self._tp.rank})"

    def full(self) -> Tensor:
        """The full logits (gathered once, differentiably)."""
        if self._full is None:
            self._full = gather_logits(self._local, self._tp, self._spec)
        return self._full

    def _rewrap(self, local: Tensor) -> ShardedLogits:
        return ShardedLogits(local, self._tp, self._spec)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        first = args[0] if args else None
        if isinstance(first, ShardedLogits):
            kept = first._keep_split(func, args[1:], kwargs)
            if kept is not None:
                return kept
        if func is F.cross_entropy and isinstance(first, ShardedLogits) and first.dim() == 2:
            return first._cross_entropy(*args[1:], **kwargs)
        args, kwargs = tree_map(lambda a: a.full() if isinstance(a, ShardedLogits) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError(
            f"lightning-mp: {func} was applied to LM-head logits split over the vocabulary below the Python level,"
            " where they cannot be gathered; set ModelParallel(loss_parallel=False) to hand the step full logits."
        )

    def _keep_split(self, func: Any, args: tuple, kwargs: dict) -> ShardedLogits | None:
        """The result of ``func`` on this rank's slice when it keeps the vocabulary as the last dim, else None."""
        if func in _SPLIT_KEEPING and not args and not kwargs:
            return self._rewrap(func(self._local))
        if func is Tensor.to and not kwargs and len(args) == 1 and isinstance(args[0], torch.dtype):
            return self._rewrap(self._local.to(args[0]))
        if func in _RESHAPES and not kwargs:
            shape = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else list(args)
            if shape and shape[-1] == self._spec.full_size and all(isinstance(n, int) for n in shape):
                shape[-1] = self._local.shape[-1]
                return self._rewrap(func(self._local, shape))
        if func is Tensor.__getitem__ and len(args) == 1:
            index = args[0] if isinstance(args[0], tuple) else (args[0],)
            simple = all(isinstance(i, (slice, int)) for i in index)
            if simple and len(index) < self.dim():  # leaves the last dim whole
                return self._rewrap(self._local[args[0]])
        return None

    def _cross_entropy(self, target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """PyTorch's vocabulary-parallel cross-entropy on this rank's slice; a plain (replicated) loss."""
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size(self.shape)
        stride = torch.empty(shape, device="meta").stride()
        logits = DTensor.from_local(self._local, _mesh_of(self._tp), [Shard(1)], run_check=False, shape=shape,
                                    stride=stride)  # fmt: skip
        loss = F.cross_entropy(logits, target, *args, **kwargs)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss


_meshes: dict[int, Any] = {}


def _mesh_of(tp: TPGroup) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    key = id(tp.group)
    if key not in _meshes:
        ranks = dist.get_process_group_ranks(tp.group)
        device = "cuda" if dist.get_backend(tp.group) == "nccl" else "cpu"
        _meshes[key] = DeviceMesh.from_group(tp.group, device, mesh=torch.tensor(ranks), mesh_dim_names=("tp",))
    return _meshes[key]

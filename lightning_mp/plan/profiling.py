"""Measuring what each layer costs on a real micro-batch: forward+backward time and the activations it keeps.

The user's own step runs once on the whole model (after a warm-up run), with forward hooks on the layers and
gradient hooks on their outputs, so nothing about the model changes: no module is wrapped, and in-place operations
are unaffected. Layer ``i``'s backward time is the time between the gradient of its output and the gradient of its
input arriving; the modules before the layers, and the head with the loss after them, are measured the same way.
Random-number state, buffers (BatchNorm statistics) and gradients are restored afterwards.

A model too large for one device can be planned on the meta device (parameters and batch without storage): the same
hooks then read a FLOP counter instead of a clock, and FLOPs become seconds at the matrix-product rate measured on
this machine. Activation bytes are counted from shapes either way, so "memory" balancing is exact on meta too.
"""

from __future__ import annotations

import contextlib
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_mp.plan.discovery import ModelLayers
from lightning_mp.runtime.clock import synchronized_timer
from lightning_mp.runtime.messages import flatten
from lightning_mp.runtime.tree import tree_map


@dataclass
class LayerCosts:
    """Per-layer costs of one micro-batch, plus those of the modules before (``pre``) and after (``post``) them."""

    layer_time: list[float]
    pre_time: float
    post_time: float
    layer_activation_bytes: list[int] = field(default_factory=list)
    pre_activation_bytes: int = 0
    post_activation_bytes: int = 0
    layer_output_bytes: list[int] = field(default_factory=list)  # what a split after layer i sends downstream

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer_time": self.layer_time,
            "pre_time": self.pre_time,
            "post_time": self.post_time,
            "layer_activation_bytes": self.layer_activation_bytes,
            "pre_activation_bytes": self.pre_activation_bytes,
            "post_activation_bytes": self.post_activation_bytes,
            "layer_output_bytes": self.layer_output_bytes,
        }


class _Recorder:
    def __init__(self, layers: ModelLayers, param_storages: set[int], clock: Callable[[], float]) -> None:
        self.clock = clock
        n = layers.num_layers
        self.n = n
        self.f_start = [0.0] * n
        self.f_end = [0.0] * n
        self.out_grad = [0.0] * n  # the gradient of layer i's output arrived: its backward starts
        self.in_grad = [None] * n  # the gradient of layer i's input arrived: its backward ended
        self.current = -1  # -1: before the layers; n: after them
        self.saved = [0] * (n + 2)  # bytes saved for backward: [pre, layer 0..n-1, post]
        self.output_bytes = [0] * n
        self.param_storages = param_storages
        self.inputs: list[tuple[tuple, dict] | None] | None = None  # with capture: each layer's (args, kwargs)

    def pre_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.current = index
            if self.inputs is not None and self.inputs[index] is None:
                self.inputs[index] = tree_map(_detached_copy, (args, kwargs))
            self.f_start[index] = self.clock()
            for t in flatten(args)[0]:
                if t.requires_grad:
                    t.register_hook(self._stamp(self.in_grad, index))
                    break

        return hook

    def post_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.f_end[index] = self.clock()
            self.current = self.n if index == self.n - 1 else index
            tensors = flatten(output)[0]
            self.output_bytes[index] = sum(t.numel() * t.element_size() for t in tensors)
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(self._stamp(self.out_grad, index))
                    break

        return hook

    def _stamp(self, target: list, index: int) -> Callable:
        def hook(grad: Tensor) -> None:
            target[index] = self.clock()

        return hook

    def pack(self, t: Tensor) -> Tensor:
        if storage_id(t) not in self.param_storages:
            self.saved[self.current + 1] += t.numel() * t.element_size()
        return t


def profile_layers(
    module: nn.Module,
    layers: ModelLayers,
    run_step: Callable[[], Tensor | None],
    repeats: int = 3,
    on: torch.device | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> LayerCosts:
    """Time each layer's forward+backward (median of ``repeats`` runs after two warm-ups) and count activations.

    ``run_step`` runs the user's step on one micro-batch and returns the loss (None: forward only). When the
    parameters are on the meta device, one run counts FLOPs instead (see the module docstring). With ``on``, a
    device other than the model's (a GPU, while the whole model is still on the CPU at set-up), the step runs once
    where the model is, and each layer is then timed alone on ``on``, under ``context`` (the run's autocast), on the
    input it was called with: one layer at a time on that device, never the whole model (:func:`time_layers_on`).
    """
    device = next((p.device for p in module.parameters()), None)
    if on is not None and device is not None and device != on and device.type != "meta":
        return _profile_layer_by_layer(module, layers, run_step, on, context, repeats)
    on_meta = any(p.is_meta for p in module.parameters())
    counter = FlopCounterMode(display=False) if on_meta else None
    # on a GPU, host time is launch time: each stamp waits for the queued work first (set-up runs this once)
    clock = (lambda: float(counter.get_total_flops())) if counter is not None else synchronized_timer(device)
    warmups, repeats = (0, 1) if on_meta else (2, repeats)
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    grads = {p: p.grad for p in module.parameters()}
    param_storages = {storage_id(p) for p in module.parameters()}
    runs = []
    with preserved_random_state(), restored_state(module, buffers, grads):
        for attempt in range(repeats + warmups):  # warm-up runs: allocator and kernels settle
            for p in grads:
                p.grad = None
            rec = _Recorder(layers, param_storages, clock)
            with contextlib.ExitStack() as modes:
                if counter is not None:
                    modes.enter_context(counter)
                    modes.enter_context(MetaScalars())
                run = _one_run(layers, run_step, rec)
            runs.append(run if attempt >= warmups else None)
    runs = [r for r in runs if r is not None]
    scale = 1.0 / matmul_flops_per_second() if on_meta else 1.0
    median = lambda values: scale * statistics.median(values)  # noqa: E731
    n = layers.num_layers
    return LayerCosts(
        layer_time=[median([r[0][i] for r in runs]) for i in range(n)],
        pre_time=median([r[1] for r in runs]),
        post_time=median([r[2] for r in runs]),
        layer_activation_bytes=runs[-1][3][1 : n + 1],
        pre_activation_bytes=runs[-1][3][0],
        post_activation_bytes=runs[-1][3][n + 1],
        layer_output_bytes=runs[-1][4],
    )


def _profile_layer_by_layer(
    module: nn.Module,
    layers: ModelLayers,
    run_step: Callable[[], Tensor | None],
    on: torch.device,
    context: Callable[[], contextlib.AbstractContextManager],
    repeats: int,
) -> LayerCosts:
    """:func:`profile_layers` with ``on``: one whole-step run where the model is (its call order, the modules
    around the layers, each layer's input), then the layers timed one by one on ``on``; the modules before and after
    the layers scaled from the model's device by the layers' ratio of times (and bytes)."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    grads = {p: p.grad for p in module.parameters()}
    rec = _Recorder(layers, {storage_id(p) for p in module.parameters()}, time.perf_counter)
    rec.inputs = [None] * layers.num_layers
    with preserved_random_state(), restored_state(module, buffers, grads):
        for p in grads:
            p.grad = None
        times, pre, post, saved, _ = _one_run(layers, run_step, rec)
    backward = any(rec.out_grad)
    here = time_layers_on(on, layers, rec.inputs, backward, context, repeats)
    time_ratio = sum(here.layer_time) / max(sum(times), 1e-12)
    byte_ratio = sum(here.layer_activation_bytes) / max(sum(saved[1:-1]), 1)
    return LayerCosts(
        layer_time=here.layer_time,
        pre_time=pre * time_ratio,
        post_time=post * time_ratio,
        layer_activation_bytes=here.layer_activation_bytes,
        pre_activation_bytes=int(saved[0] * byte_ratio),
        post_activation_bytes=int(saved[-1] * byte_ratio),
        layer_output_bytes=here.layer_output_bytes,
    )


def time_layers_on(
    device: torch.device,
    layers: ModelLayers,
    inputs: list[tuple[tuple, dict] | None],
    backward: bool,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    repeats: int = 3,
) -> LayerCosts:
    """Each layer alone on ``device``, on ``inputs[i]`` (its (args, kwargs) in the whole step): moved there, timed
    forward (and, with ``backward``, backward against a gradient of ones; median of ``repeats`` after a warm-up)
    under ``context``, its saved activations and output counted, moved back. Only ``layers``' costs are set; its
    parameters, gradients and buffers end as they were."""
    clock = synchronized_timer(device)
    costs = LayerCosts([], 0.0, 0.0)
    for i in range(layers.num_layers):
        layer, given = layers.layer(i), inputs[i]
        if given is None:  # a layer the step never called costs nothing
            costs.layer_time.append(0.0)
            costs.layer_activation_bytes.append(0)
            costs.layer_output_bytes.append(0)
            continue
        home = next((p.device for p in layer.parameters()), torch.device("cpu"))
        buffers = {n: b.detach().clone() for n, b in layer.named_buffers()}
        grads = {p: p.grad for p in layer.parameters()}
        layer.to(device)
        try:
            storages = {storage_id(p) for p in layer.parameters()}
            runs, saved, out = [], 0, 0
            with preserved_random_state():
                for attempt in range(repeats + 1):
                    args, kwargs = tree_map(lambda t: _leaf_on(t, device), given)
                    held: list[int] = [0]

                    def pack(t: Tensor, held: list[int] = held, storages: set[int] = storages) -> Tensor:
                        if storage_id(t) not in storages:
                            held[0] += t.numel() * t.element_size()
                        return t

                    start = clock()
                    with context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        output = layer(*args, **kwargs)
                    tensors = [t for t in flatten(output)[0] if t.requires_grad]
                    if backward and tensors:
                        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
                    if attempt:
                        runs.append(clock() - start)
                    saved, out = held[0], sum(t.numel() * t.element_size() for t in flatten(output)[0])
                    for p in layer.parameters():
                        p.grad = None
        finally:
            layer.to(home)
            with restored_state(layer, buffers, grads):
                pass
        costs.layer_time.append(statistics.median(runs))
        costs.layer_activation_bytes.append(saved)
        costs.layer_output_bytes.append(out)
    return costs


def _detached_copy(t: Tensor) -> Tensor:
    """A layer's input kept for measuring it alone: detached, with its ``requires_grad``."""
    return t.detach().clone().requires_grad_(t.requires_grad)


def _leaf_on(t: Tensor, device: torch.device) -> Tensor:
    return t.detach().to(device).requires_grad_(t.requires_grad)


@contextlib.contextmanager
def preserved_random_state(*generators: torch.Generator) -> Iterator[None]:
    """Leave the global random states (torch, CUDA, ``random``, NumPy) and ``generators`` as they were found."""
    states = (torch.get_rng_state(), random.getstate(), [g.get_state() for g in generators])
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_random = sys.modules.get("numpy.random")
    np_state = np_random.get_state() if np_random is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        for g, state in zip(generators, states[2]):
            g.set_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if np_random is not None:
            np_random.set_state(np_state)


@contextlib.contextmanager
def restored_state(
    module: nn.Module, buffers: dict[str, Tensor], grads: dict[nn.Parameter, Tensor | None]
) -> Iterator[None]:
    try:
        yield
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(buffers[n])


class MetaScalars(TorchDispatchMode):
    """Answers ``.item()`` on a meta tensor (which has no value) with True / 1: models read masks this way, e.g.
    "is the attention mask all ones?", and the plan only needs shapes."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        return func(*args, **(kwargs or {}))


def storage_id(t: Tensor) -> int:
    """Identifies a tensor's storage, shared by its views; unlike ``data_ptr`` it also tells meta tensors apart."""
    return t.untyped_storage()._cdata


@functools.cache
def matmul_flops_per_second(size: int = 512) -> float:
    """FLOP/s of a float32 ``size``×``size`` matrix product on this machine's CPU (what a meta plan's FLOPs cost)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - start)
    return 2 * size**3 / max(statistics.median(runs), 1e-9)


def _one_run(layers: ModelLayers, run_step: Callable[[], Tensor | None], rec: _Recorder) -> tuple:
    handles = []
    for i in range(layers.num_layers):
        handles.append(layers.layer(i).register_forward_pre_hook(rec.pre_hook(i), with_kwargs=True))
        handles.append(layers.layer(i).register_forward_hook(rec.post_hook(i)))
    try:
        start = rec.clock()
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = run_step()
        forward_end = rec.clock()
        if loss is not None and loss.requires_grad:
            loss.backward()
        end = rec.clock()
    finally:
        for h in handles:
            h.remove()
    n = rec.n
    backward = loss is not None and loss.requires_grad
    times = []
    for i in range(n):
        forward = rec.f_end[i] - rec.f_start[i]
        if not backward:
            times.append(forward)
            continue
        grad_in = rec.in_grad[i] if rec.in_grad[i] is not None else (rec.out_grad[i - 1] if i else end)
        times.append(forward + max(0.0, grad_in - rec.out_grad[i]))
    pre = rec.f_start[0] - start
    post = forward_end - rec.f_end[n - 1]
    if backward:
        first_in = rec.in_grad[0]
        pre += max(0.0, end - first_in) if first_in is not None else 0.0
        post += max(0.0, rec.out_grad[n - 1] - forward_end)
    return times, pre, post, rec.saved, rec.output_bytes


def observe_call_order(module: nn.Module, run_step: Callable[[], Any]) -> list[str]:
    """The names of ``module``'s submodules in the order the step calls them, repeats included (one forward, no
    gradients): where the modules outside the layers really run, before, between or after the layers. Random
    states, buffers and gradients are left as they were; a meta-device model runs on shapes alone."""
    names = {id(m): n for n, m in module.named_modules()}
    order: list[str] = []

    def seen(called: nn.Module, args: Any) -> None:
        name = names.get(id(called))
        if name is not None and (not order or order[-1] != name):
            order.append(name)

    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    grads = {p: p.grad for p in module.parameters()}
    handle = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    on_meta = any(p.is_meta for p in module.parameters())
    try:
        scalars = MetaScalars() if on_meta else contextlib.nullcontext()
        with preserved_random_state(), restored_state(module, buffers, grads), torch.no_grad(), scalars:
            run_step()
    finally:
        handle.remove()
    return order

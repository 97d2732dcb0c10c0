"""What travels between layers besides the activation: observed once, on one real micro-batch, at set-up.

Most models hand each layer the previous layer's output and values computed from the batch alone (masks, position
tables), which every stage can compute itself. Some hand later layers tensors that came from the model's own
parameters or layers by another way: an encoder's output read by every decoder block, a learned position table
computed once. :func:`observe_layer_inputs` runs the step once and records, for every layer, each tensor it was
called with: the same tensor object (one key) wherever it recurs, whether it came from parameters or layers
(*derived*) or from the batch, and whether it is part of the previous layer's output (the activation itself). It
also records layer outputs used after the last layer (``output_hidden_states``, a weighted sum of layers), which
the stage plan refuses when they would live on another stage than the last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_mp.plan.discovery import ModelLayers
from lightning_mp.plan.profiling import MetaScalars, preserved_random_state, restored_state
from lightning_mp.runtime.tree import Path, tensors_with_paths, tree_leaves


@dataclass(frozen=True)
class LayerInput:
    """One tensor a layer was called with."""

    path: Path  # where in (args, kwargs)
    key: int  # the same for every layer input that is the same tensor
    derived: bool  # computed from the model's parameters or layers, not from the batch alone
    main: bool  # part of the previous layer's output: it travels as the activation


@dataclass
class LayerFlow:
    """The observed inputs of every layer, and the layer outputs used after the last layer."""

    inputs: list[list[LayerInput]] = field(default_factory=list)
    late_uses: list[tuple[int, str]] = field(default_factory=list)  # (layer, the operation) after the layers


class _Provenance(TorchFunctionMode):
    """Follows, outside the layers, which tensors come from parameters or layer outputs, and from which layer last."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.keep: list[Tensor] = list(params)  # strong references: ids stay unique for the one forward
        self.derived: set[int] = {id(p) for p in params}
        self.layer_of: dict[int, int] = {}  # tensor id -> the latest layer whose output it comes from
        self.depth = 0  # > 0 inside a layer call
        self.finished: int | None = None  # set once the last layer returned: the number of layers
        self.late_uses: list[tuple[int, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.depth:
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if self.finished is not None:
            for t in inputs:
                layer = self.layer_of.get(id(t))
                if layer is not None and layer < self.finished - 1:
                    self.late_uses.append((layer, getattr(func, "__name__", str(func))))
        if any(id(t) in self.derived for t in inputs):
            latest = max((self.layer_of.get(id(t), -1) for t in inputs), default=-1)
            self.mark(out, latest)
        return out

    def mark(self, value: Any, layer: int) -> None:
        for t in tree_leaves(value):
            self.keep.append(t)
            self.derived.add(id(t))
            if layer >= 0:
                self.layer_of[id(t)] = layer


def observe_layer_inputs(module: nn.Module, layers: ModelLayers, run_step: Callable[[], Any]) -> LayerFlow:
    """Run ``run_step`` once (no gradients, states restored) and record what each layer of ``layers`` is called
    with (see the module docstring)."""
    flow = LayerFlow(inputs=[[] for _ in range(layers.num_layers)])
    tracker = _Provenance(list(module.parameters()))
    keys: dict[int, int] = {}
    previous_output: set[int] = set()

    def before(index: int) -> Callable:
        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
            if tracker.depth == 0 and not flow.inputs[index]:
                for path, t in tensors_with_paths((args, kwargs)):
                    key = keys.setdefault(id(t), len(keys))
                    tracker.keep.append(t)
                    main = id(t) in previous_output
                    flow.inputs[index].append(LayerInput(path, key, id(t) in tracker.derived, main))
            tracker.depth += 1

        return hook

    def after(index: int) -> Callable:
        def hook(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            tracker.depth -= 1
            if tracker.depth == 0:
                tracker.mark(output, index)
                previous_output.clear()
                previous_output.update(id(t) for t in tree_leaves(output))
                if index == layers.num_layers - 1:
                    tracker.finished = layers.num_layers

        return hook

    handles = []
    for i in range(layers.num_layers):
        handles.append(layers.layer(i).register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(layers.layer(i).register_forward_hook(after(i), with_kwargs=True))
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    grads = {p: p.grad for p in module.parameters()}
    on_meta = any(p.is_meta for p in module.parameters())
    try:
        scalars = MetaScalars() if on_meta else contextlib.nullcontext()
        with preserved_random_state(), restored_state(module, buffers, grads), torch.no_grad(), scalars, tracker:
            run_step()
    finally:
        for handle in handles:
            handle.remove()
    flow.late_uses = sorted(set(tracker.late_uses))
    return flow

"""Finding the repeated layers of an unmodified model, and where each other parameterized module runs.

The layers are the children of one block container (``transformer.h``, ``model.layers``, an ``nn.Sequential``),
or, where one observed forward runs several such containers one after the other (an encoder's blocks, then a
decoder's), of all of them in that order: one sequence of layers to split. Every other parameterized module is
placed by where that forward calls it: before the first layer, after the last, or between two layers (an encoder's
final norm, a decoder's embedding). Without an observed forward, registration order decides before or after.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_mp.runtime.errors import ModelSplitError


@dataclass
class ModelLayers:
    """The layers of a model and where every parameterized module outside them runs.

    ``positions[name]`` lists where module ``name`` runs, as the number of layers that ran before it: 0 before the
    first layer, ``num_layers`` after the last. ``pre`` modules run only before the layers (on the first stage),
    ``post`` modules only after them (on the last stage); any other runs between layers (on the stage of the layer
    after it), or at several places. Names are relative to the root module given to :func:`discover_layers`.
    """

    segments: list[tuple[str, nn.Module]]  # (name, container) of each block container, in the order they run
    layer_names: list[str]
    positions: dict[str, list[int]] = field(default_factory=dict)
    observed: bool = False  # positions come from an observed forward (else from registration order)
    inputs: list[list[Any]] | None = None  # per layer, the tensors it was called with (see plan.flow), when observed
    late_uses: list[tuple[int, str]] = field(default_factory=list)  # layer outputs used after the last layer

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def container_name(self) -> str:
        """The (first) block container's name."""
        return self.segments[0][0]

    @property
    def container(self) -> nn.Module:
        return self.segments[0][1]

    @property
    def display_name(self) -> str:
        return " + ".join(name for name, _ in self.segments)

    @property
    def container_names(self) -> list[str]:
        return [name for name, _ in self.segments]

    @property
    def pre(self) -> list[str]:
        return [n for n, ps in self.positions.items() if set(ps) == {0}]

    @property
    def post(self) -> list[str]:
        return [n for n, ps in self.positions.items() if set(ps) == {self.num_layers}]

    @property
    def between(self) -> dict[str, list[int]]:
        """Modules that run between layers (or at several places), with where they run."""
        return {n: ps for n, ps in self.positions.items() if n not in self.pre and n not in self.post}

    def _slot(self, index: int) -> tuple[nn.Module, int]:
        for _, container in self.segments:
            if index < len(container):
                return container, index
            index -= len(container)
        raise IndexError(f"layer {index} out of range")

    def layer(self, index: int) -> nn.Module:
        container, i = self._slot(index)
        return container[i]  # type: ignore[index]

    def set_layer(self, index: int, module: nn.Module) -> None:
        """Put ``module`` in layer ``index``'s place in its container."""
        container, i = self._slot(index)
        container[i] = module  # type: ignore[index]

    def is_layer_module(self, name: str) -> bool:
        """Whether ``name`` is a layer container or inside one."""
        return any(name == c or name.startswith(c + ".") for c in self.container_names if c) or (
            "" in self.container_names
        )


def discover_layers(root: nn.Module, layers: str | None = None, call_order: list[str] | None = None) -> ModelLayers:
    """Find the containers of blocks to split (or take those named by ``layers``, comma-separated, in run order)
    and place the rest: by ``call_order`` (submodule names in the order one forward called them, repeats included)
    where it has them, else by registration order.

    Automatic discovery picks, among the ``nn.ModuleList`` and ``nn.Sequential`` containers with at least two
    children (a ``ModuleList`` holding blocks of one class), the one whose children hold the most parameters; with
    ``call_order``, also the containers run right before or after it whose blocks are as large (an encoder-decoder).

    Raises:
        ModelSplitError: no such container exists, or ``layers`` names something that is not one.
    """
    if layers is not None:
        segments = [(name, _named_container(root, name)) for name in layers.split(",")]
    else:
        segments = _largest_chain(root, call_order)
    layer_names = [f"{name}.{i}" if name else str(i) for name, c in segments for i in range(len(c))]
    found = ModelLayers(segments, layer_names)
    if call_order and all(n in call_order for n in layer_names):
        found.positions, found.observed = _observed_positions(root, found, call_order), True
    else:
        found.positions = _registered_positions(root, found)
    return found


def _named_container(root: nn.Module, name: str) -> nn.Module:
    container = _get_submodule(root, name)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 1:
        raise ModelSplitError(
            f"layers={name!r} is a {type(container).__name__}, not an nn.ModuleList or nn.Sequential of blocks."
            f" Candidates in this model: {_candidate_names(root) or 'none'}."
        )
    return container


def _largest_chain(root: nn.Module, call_order: list[str] | None) -> list[tuple[str, nn.Module]]:
    """The largest block container and, when the forward was observed, the containers that run in sequence with
    it and hold at least a quarter of its parameters (an encoder's blocks, then a decoder's)."""
    candidates = [(name, module, _params(module)) for name, module in _containers(root)]
    if not candidates:
        raise ModelSplitError(
            f"found no repeated blocks to split in {type(root).__name__}: lightning-mp splits an nn.ModuleList of"
            " same-class blocks or an nn.Sequential. Put the model's layers in one, or name it with layers='...'."
        )
    name, module, size = max(candidates, key=lambda c: (c[2], len(c[1])))
    if not call_order:
        return [(name, module)]
    first_call = {n: i for i, n in reversed(list(enumerate(call_order)))}
    spans = {}
    for n, m, p in candidates:
        calls = [first_call.get(f"{n}.{i}" if n else str(i)) for i in range(len(m))]
        if p * 4 >= size and all(c is not None for c in calls) and calls == sorted(calls):
            spans[n] = (calls[0], calls[-1], m)
    if name not in spans:
        return [(name, module)]
    chain = [name]
    for other in sorted(spans, key=lambda n: spans[n][0]):  # add the containers that run wholly before or after
        nested = any(other.startswith(c + ".") or c.startswith(other + ".") for c in chain)
        if other in chain or nested:
            continue
        start, end, _ = spans[other]
        if all(end < spans[c][0] or start > spans[c][1] for c in chain):
            chain.append(other)
    chain.sort(key=lambda n: spans[n][0])
    return [(n, spans[n][2]) for n in chain]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _containers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        if isinstance(module, nn.Sequential) or len({type(m) for m in module}) == 1:
            yield name, module


def _candidate_names(root: nn.Module) -> str:
    return ", ".join(f"{n!r} ({len(m)} blocks)" for n, m in _containers(root))


def _get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    try:
        return root.get_submodule(dotted)
    except AttributeError as err:
        raise ModelSplitError(
            f"layers={dotted!r} does not name a submodule of {type(root).__name__}."
            f" Candidates: {_candidate_names(root) or 'none'}."
        ) from err


def _outside_modules(root: nn.Module, found: ModelLayers) -> list[str]:
    """The modules outside the layers that hold parameters of their own, in registration order."""
    names = []
    for name, module in root.named_modules(remove_duplicate=False):
        if found.is_layer_module(name) or (not name and "" in found.container_names):
            continue
        if any(True for _ in module.parameters(recurse=False)) and name not in names:
            names.append(name)
    return names


def _registered_positions(root: nn.Module, found: ModelLayers) -> dict[str, list[int]]:
    """Before (0) or after (``num_layers``) the layers, as registered relative to the first container."""
    first = found.container_name
    order = [name for name, _ in root.named_modules(remove_duplicate=False)]
    start = order.index(first) if first in order else 0
    positions = {}
    for name in _outside_modules(root, found):
        index = order.index(name)
        positions[name] = [found.num_layers if index > start and first else 0]
    return positions


def _observed_positions(root: nn.Module, found: ModelLayers, call_order: list[str]) -> dict[str, list[int]]:
    """Where each module outside the layers ran in ``call_order``: the number of layers called before each call.
    A parameter holder never called itself counts where its nearest called parent runs; one never reached at all
    goes by registration order."""
    layer_index = {n: i for i, n in enumerate(found.layer_names)}
    at: dict[str, list[int]] = {}
    ran = 0
    for name in call_order:
        if name in layer_index:
            ran = max(ran, layer_index[name] + 1)
        elif not any(name.startswith(n + ".") for n in found.layer_names):
            spots = at.setdefault(name, [])
            if ran not in spots:
                spots.append(ran)
    registered = _registered_positions(root, found)
    positions = {}
    for name in _outside_modules(root, found):
        owner = name
        while owner not in at and owner:
            owner = owner.rpartition(".")[0]
        holds_layers = any(c.startswith(owner + ".") or not owner for c in found.container_names)
        positions[name] = at[owner] if owner in at and not holds_layers else registered[name]
    return positions

"""Finding the repeated layers of an unmodified model, and which stage each other parameter belongs to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lightning_mp.runtime.errors import ModelSplitError


@dataclass
class ModelLayers:
    """The layer container of a model and where every parameterized module outside it runs.

    ``pre`` modules run before the layers, on the first stage; ``post`` modules run after them, on the last stage.
    Where the model's forward was observed (see :func:`discover_layers`), that is where they ran; otherwise where
    they are registered, before or after the container. Names are relative to the root module given to
    :func:`discover_layers`.
    """

    container_name: str
    container: nn.Module
    layer_names: list[str]
    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def layer(self, index: int) -> nn.Module:
        return self.container[index]  # type: ignore[index]


def discover_layers(root: nn.Module, layers: str | None = None, call_order: list[str] | None = None) -> ModelLayers:
    """Find the container of blocks to split (or take the one named by ``layers``) and classify the rest: by
    ``call_order`` (submodule names in the order one forward first called them) where it names a module, else by
    registration order.

    Automatic discovery picks, among the ``nn.ModuleList`` and ``nn.Sequential`` containers with at least two
    children, the one whose children hold the most parameters; a ``ModuleList`` must hold blocks of one class.

    Raises:
        ModelSplitError: no such container exists, or ``layers`` names something that is not one.
    """
    if layers is not None:
        container = _get_submodule(root, layers)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 1:
            raise ModelSplitError(
                f"layers={layers!r} is a {type(container).__name__}, not an nn.ModuleList or nn.Sequential of blocks."
                f" Candidates in this model: {_candidate_names(root) or 'none'}."
            )
        name = layers
    else:
        name, container = _largest_container(root)
    layer_names = [f"{name}.{i}" if name else str(i) for i in range(len(container))]
    pre, post = _classify_outside(root, name, call_order)
    return ModelLayers(name, container, layer_names, pre, post)


def _largest_container(root: nn.Module) -> tuple[str, nn.Module]:
    best: tuple[int, int, str, nn.Module] | None = None
    for name, module in _containers(root):
        params = sum(p.numel() for p in module.parameters())
        key = (params, len(module))
        if best is None or key > best[:2]:
            best = (params, len(module), name, module)
    if best is None:
        raise ModelSplitError(
            f"found no repeated blocks to split in {type(root).__name__}: lightning-mp splits an nn.ModuleList of"
            " same-class blocks or an nn.Sequential. Put the model's layers in one, or name it with layers='...'."
        )
    return best[2], best[3]


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


def _classify_outside(
    root: nn.Module, container_name: str, call_order: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Split the parameterized modules outside the container into those that run before and after it: as observed
    in ``call_order`` (a module first called after the container's first layer runs after the layers), else as
    registered."""
    pre: list[str] = []
    post: list[str] = []
    position = {name: i for i, name in enumerate(call_order or [])}
    first_layer = position.get(f"{container_name}.0" if container_name else "0")
    seen_container = False
    prefix = container_name + "."
    for name, module in root.named_modules(remove_duplicate=False):
        if name == container_name:
            seen_container = True
            continue
        if container_name and (name.startswith(prefix)):
            continue
        if not container_name and name:
            continue  # the root itself is the container: nothing outside it but the root's own parameters
        if any(True for _ in module.parameters(recurse=False)):
            ran = _first_call(name, position)
            after = ran > first_layer if ran is not None and first_layer is not None else seen_container
            (post if after else pre).append(name)
    return pre, post


def _first_call(name: str, position: dict[str, int]) -> int | None:
    """When the module ``name`` (or, for a parameter holder that is never called itself, its nearest called
    parent) first ran, as a position in the observed call order."""
    while True:
        if name in position:
            return position[name]
        if not name:
            return None
        name = name.rpartition(".")[0]

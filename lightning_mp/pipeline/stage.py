"""Turning a full model into one pipeline stage in place: stand-ins for the layers and modules of other stages.

The user's own code keeps running on every stage. On stage ``s``, whose layers are ``first..last``:

- the layers before ``first`` are :class:`RemoteLayer` stand-ins. The one just before ``first`` returns what stage
  ``s - 1`` sent (the whole output of its last layer, rebuilt); earlier ones return a detached copy of it, so that the
  model's loop keeps the shapes and structure it expects at no cost;
- layer ``last`` hands what its call returned to the runtime and, unless ``s`` is the last stage, ends the forward
  with :class:`StageDone`, so the head, the loss and ``self.log`` run on the last stage only;
- parameterized modules registered before the layers belong to the first stage, those after to the last. Elsewhere an
  ``nn.Embedding`` becomes a :class:`ZeroEmbedding` (its output is overwritten by the received activation), a
  module after the layers becomes :class:`Unreachable`, and any other module keeps its code but its parameters
  become plain tensors, so that ``named_parameters()`` on a stage lists exactly the stage's own parameters, under
  their original names. A parameter used on two stages (an LM head tied to the embedding) is kept by both.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lightning_mp.plan.profiling import storage_id
from lightning_mp.plan.stage_plan import PLACEHOLDER, Carry, StagePlan, shared_parameters, stage_parameters
from lightning_mp.runtime.errors import ModelSplitError, PipelineError
from lightning_mp.runtime.messages import Received, flatten, unflatten
from lightning_mp.runtime.tree import tensors_with_paths, tree_map_with_path


class StageDone(BaseException):
    """Ends a non-last stage's forward after its last layer. A BaseException, so ``except Exception`` in user code
    does not swallow it."""


@dataclass
class _ForwardState:
    chunk: int = -1  # the (virtual) stage this forward runs
    received: Received | None = None
    detached: Any = None
    carried_in: dict[int, Tensor] = field(default_factory=dict)  # tensors received beside the activation, by key
    carried_out: dict[int, Tensor] = field(default_factory=dict)  # this forward's, to send on beside the output
    captured: Any = None
    calls: list[int] = field(default_factory=list)
    active: bool = False
    grad_enabled: bool = False


class StageRuntime:
    """Applies a :class:`StagePlan` to the model of one rank and drives its stand-ins and hooks during a forward."""

    def __init__(
        self, root: nn.Module, plan: StagePlan, stage: int, movable: bool = False, chunks: list[int] | None = None
    ) -> None:
        """``movable``: keep a parameter-less (meta-device) skeleton of every other stage's layer, so that layers
        can move between stages later (:meth:`release_layer`, :meth:`adopt_layer`). ``chunks``: with interleaved
        schedules, the virtual stages of ``plan`` this rank (pipeline position ``stage``) runs; each forward runs
        one of them (:meth:`begin_forward`), the rank's other layers standing in as remote ones."""
        self.plan = plan
        self.stage = stage
        self.chunks = list(chunks) if chunks is not None else [stage]
        self.is_last = plan.num_stages - 1 in self.chunks
        self.active = plan.layer_range(self.chunks[0])  # the layers of the (virtual) stage running
        self.own_layers: range | list[int] = (
            self.active if len(self.chunks) == 1 else [i for k in self.chunks for i in plan.layer_range(k)]
        )
        self._slot = {index: n for n, index in enumerate(self.own_layers)}
        self._state = _ForwardState()
        # Tensors of first-stage modules on later stages: a gradient reaching one means the model routes something
        # around the layers, which a split at the layers cannot carry (see check_no_bypass).
        self._watched: list[tuple[str, Tensor]] = []
        self._step_watched: list[tuple[str, Tensor]] = []
        self.layer_forward_s = [0.0] * len(self.own_layers)  # per own layer, since take_layer_forward_times
        self._timing: tuple[int, float] | None = None
        self._trace_handles: dict[int, Any] = {}
        self._skeletons: dict[int, nn.Module] = {}
        self.movable = movable
        self.checkpointing = False  # recompute the own layers' activations in backward (set per micro-batch)
        self.checkpoint_every = 1  # while checkpointing: every n-th own layer (1: all of them)
        self.after_layers: Callable[[], None] | None = None  # called when the model's last layer has returned
        self._root = root
        self.shared_params = shared_parameters(root, plan)
        self._carries: dict[int, tuple[list[Carry], list[Carry]]] = {}  # chunk -> (carried in, carried out)
        self._plan_carries()
        self._install(root)
        if not any(p.requires_grad for p in root.parameters()):
            # A frozen stage still builds the user's optimizer (so that every rank steps in lockstep), and
            # optimizers reject an empty parameter list: give it one empty parameter, outside checkpoints.
            plan.layers.container.register_parameter(PLACEHOLDER, nn.Parameter(torch.zeros(0)))

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _install(self, root: nn.Module) -> None:
        layers = self.plan.layers
        needed = {id(p) for k in self.chunks for p in stage_parameters(root, self.plan, k)}
        last_of = {self.plan.layer_range(k).stop - 1: k for k in self.chunks}
        for i in range(layers.num_layers):
            if i in self._slot:
                self._trace(i)
                _checkpoint_when(layers.layer(i), self, i)
                if i in last_of:
                    _call_then(layers.layer(i), functools.partial(self._capture, chunk=last_of[i]))
                if len(self.chunks) > 1:
                    _run_when_active(layers.layer(i), self, i)
            else:
                original = layers.layer(i)
                remote = RemoteLayer(i, self, original)
                if self.movable:
                    self._skeletons[i] = remote.skeleton
                layers.set_layer(i, remote)
        post = set(layers.post)
        for name in layers.positions:
            try:
                module = root.get_submodule(name) if name else root
            except AttributeError:
                continue  # inside a module replaced above
            if all(id(p) in needed for p in module.parameters(recurse=False)):
                continue
            if name in post:
                _replace(root, name, Unreachable(name, self.stage))
            elif isinstance(module, nn.Embedding):
                _replace(root, name, ZeroEmbedding(module, name, self))
            else:
                self._watched += [(name, t) for t in _demote_parameters(module, needed) if t.requires_grad]
                if not layers.observed:  # placed by registration order: make a wrong guess an error
                    module.register_forward_pre_hook(self._make_order_guard(name))

    def _trace(self, index: int) -> None:
        layer = self.plan.layers.layer(index)
        self._trace_handles[index] = layer.register_forward_pre_hook(self._make_trace_hook(index))
        if self._carrying:
            layer.register_forward_pre_hook(self._carry_hook(index), with_kwargs=True)

    def _plan_carries(self) -> None:
        """Which tensors each of this rank's (virtual) stages receives and sends beside the activation."""
        plan, last = self.plan, self.plan.num_stages - 1
        self._carries = {k: (plan.carries_into(k), plan.carries_into(k + 1) if k < last else []) for k in self.chunks}
        self._carrying = any(a or b for a, b in self._carries.values())

    # ---- moving layers between stages (see rebalance.py) ---------------------------------------------------------
    def release_layer(self, index: int) -> None:
        """Hand layer ``index`` to another stage: a stand-in takes its place, its storage is freed."""
        block = self.plan.layers.layer(index)
        self._trace_handles.pop(index).remove()
        _undo_call_then(block)
        self._skeletons[index] = block.to("meta")  # (rebalancing runs without virtual stages)
        self.plan.layers.set_layer(index, RemoteLayer(index, self, block))

    def adopt_layer(self, index: int, state: dict[str, Tensor], device: torch.device) -> nn.Module:
        """Take layer ``index`` from another stage, with its parameters and buffers ``state``."""
        block = self._skeletons.pop(index).to_empty(device=device)
        block.load_state_dict(state)
        self.plan.layers.set_layer(index, block)
        self._trace(index)
        _checkpoint_when(block, self, index)
        return block

    def set_balance(self, balance: list[int]) -> None:
        """After layers moved: the new split (the capture moves to the new last own layer)."""
        old_last = self.plan.layers.layer(self.own_layers.stop - 1)
        _undo_call_then(old_last)
        self.plan.balance = list(balance)
        self.plan.param_counts = self.plan.prediction = None  # predictions were for the old split
        self._plan_carries()
        self.active = self.own_layers = self.plan.layer_range(self.stage)
        self._slot = {index: n for n, index in enumerate(self.own_layers)}
        self.layer_forward_s = [0.0] * len(self.own_layers)
        last = self.own_layers.stop - 1
        _call_then(self.plan.layers.layer(last), functools.partial(self._capture, chunk=self.stage))

    # ---- one forward --------------------------------------------------------------------------------------------
    def begin_forward(self, received: Received | None, chunk: int | None = None) -> None:
        """Arm the stand-ins and hooks for one micro-batch's forward of ``chunk`` (default: the rank's stage)."""
        chunk = self.chunks[0] if chunk is None else chunk
        self.active = self.plan.layer_range(chunk)
        detached, carried = None, {}
        if received is not None:
            value = unflatten(flatten(received.value)[1], [t.detach() for t in received.tensors])
            detached = value[0] if self._carries[chunk][0] else value
            if self._carries[chunk][0]:  # non-leaf views, so that in-place use keeps the received leaves intact
                carried = {k: t.clone() if t.requires_grad else t for k, t in received.value[1].items()}
        self._state = _ForwardState(
            chunk=chunk, received=received, detached=detached, carried_in=carried, active=True,
            grad_enabled=torch.is_grad_enabled(),
        )  # fmt: skip

    def is_final(self, chunk: int) -> bool:
        """Whether ``chunk`` is the model's last (virtual) stage: the one that runs the head and the loss."""
        return chunk == self.plan.num_stages - 1

    def end_forward(self) -> Any:
        """Disarm and return what the last own layer produced; check that the layers ran once each, in order."""
        state, self._state = self._state, _ForwardState()
        last_needed = self.plan.layers.num_layers - 1 if self.is_final(state.chunk) else self.active.stop - 1
        if state.calls != list(range(last_needed + 1)):
            raise ModelSplitError(self._trace_problem(state.calls, last_needed))
        return state.captured

    def abort_forward(self) -> None:
        """Disarm after the user's step raised."""
        self._state = _ForwardState()
        self._timing = None

    def _trace_problem(self, calls: list[int], last_needed: int) -> str:
        names = self.plan.layers.layer_names
        for i, c in enumerate(calls):
            if calls.count(c) > 1:
                return (
                    f"layer {names[c]} was called {calls.count(c)} times in one forward. lightning-mp splits the"
                    " model between layers and needs each layer of the container called once per forward, in"
                    " order: point layers= at a container whose blocks are each called once."
                )
            if c != i:
                return (
                    f"layer {names[c]} ran before {names[i]}: the layers of '{self.plan.layers.display_name}'"
                    " must run once each, in order. Point layers= at a container that the model runs in order."
                )
        return (
            f"stage {self.stage}'s forward ended after layers {calls[:1]}..{calls[-1:]} but must run layers 0.."
            f"{last_needed}: the step's forward does not run every layer of '{self.plan.layers.display_name}'"
            " (does training_step call the model?). Point layers= at the container that the forward runs."
        )

    def _record_call(self, index: int) -> None:
        if self._state.active:
            self._state.calls.append(index)

    def _make_trace_hook(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._record_call(index)
            if self._state.active:
                self._time_layer(index)

        return hook

    def _time_layer(self, starting: int | None) -> None:
        """Close the running own layer's forward timing; start timing ``starting`` (None: the last one ended)."""
        now = time.perf_counter()
        running = self._timing
        if running is not None:
            self.layer_forward_s[self._slot[running[0]]] += now - running[1]
        self._timing = (starting, now) if starting is not None else None

    def parameter_storages(self) -> set[int]:
        """Storage ids of the stage's parameters (saved-for-backward tensors that are parameters cost no memory)."""
        return {storage_id(p) for p in self._root.parameters()}

    def take_layer_forward_times(self) -> list[float]:
        """Seconds of forward each own layer spent since the last call (then reset)."""
        times, self.layer_forward_s = self.layer_forward_s, [0.0] * len(self.own_layers)
        return times

    def _capture(self, output: Any, chunk: int) -> Any:
        state = self._state
        if state.active and state.captured is None and chunk == state.chunk:
            self._time_layer(None)
            state.captured = output
            outgoing = self._carries[chunk][1]
            if outgoing:  # the tensors the next stage needs beside the activation
                state.captured = (output, {c.key: state.carried_out.get(c.key, state.carried_in.get(c.key)) for c in
                                           outgoing})  # fmt: skip
            if self.is_final(chunk):
                if self.after_layers is not None:
                    self.after_layers()
            else:
                if state.grad_enabled and not _carries_grad(output) and self._trains_own_layers():
                    raise PipelineError(self._no_grad_message())
                raise StageDone
        return output

    def _trains_own_layers(self) -> bool:
        return any(p.requires_grad for i in self.active for p in self.plan.layers.layer(i).parameters())

    def _no_grad_message(self) -> str:
        name = self.plan.layers.layer_names[self.active.stop - 1]
        return (
            f"layer {name} returned no tensor that carries a gradient, although stage {self.stage}'s layers train:"
            " their gradients could not flow back. This happens when the layer is called inside"
            " torch.utils.checkpoint.checkpoint(..., use_reentrant=True); use use_reentrant=False."
        )

    def remote_output(self, index: int) -> Any:
        """What the stand-in of layer ``index`` returns in the current forward."""
        self._record_call(index)
        state = self._state
        if index >= self.active.start or state.received is None:
            raise ModelSplitError(
                f"stage {self.stage} called layer {self.plan.layers.layer_names[index]}, which lives on another stage,"
                " outside a pipeline step. Run the model through the Trainer, or point layers= at the right container."
            )
        if index == self.active.start - 1:
            # Non-leaf views, so that the model's own in-place operations on a block's input keep working.
            tensors = [t.clone() if t.requires_grad else t for t in state.received.tensors]
            value = unflatten(flatten(state.received.value)[1], tensors)
            return value[0] if self._carries[state.chunk][0] else value
        return state.detached

    def _carry_hook(self, index: int) -> Callable:
        """Before own layer ``index`` runs: put the received tensors where it reads them, and keep the tensors the
        next stage needs beside the activation."""

        def hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if not state.active or index not in self.active:
                return None
            incoming, outgoing = self._carries[state.chunk]
            put = {path: state.carried_in[c.key] for c in incoming for j, path in c.consumers if j == index}
            inputs = (args, kwargs)
            if put:
                inputs = tree_map_with_path(lambda path, t: put.get(path, t), inputs)
            sources = [c for c in outgoing if c.source is not None and c.source[0] == index]
            if sources:
                found = dict(tensors_with_paths(inputs))
                for carry in sources:
                    state.carried_out[carry.key] = found[carry.source[1]]
            return inputs if put else None

        return hook

    def watch(self, name: str, tensor: Tensor) -> None:
        """Watch a stand-in's output during this step (see :meth:`check_no_bypass`)."""
        self._step_watched.append((name, tensor))

    def check_no_bypass(self) -> None:
        """After a step's backward: fail if a gradient reached a first-stage module's output on a later stage.

        Raises:
            PipelineError: the model has a connection around the layer container (e.g. the embeddings added again
                after the blocks); only the last layer's output travels between stages, so it would train wrongly.
        """
        watched, self._step_watched = self._watched + self._step_watched, []
        for name, tensor in watched:
            if tensor.grad is not None:
                raise PipelineError(
                    f"on stage {self.stage} the output of '{name}', a module of the first stage, reaches the loss"
                    f" without passing through the layers of '{self.plan.layers.display_name}': the model has a"
                    " connection around them, and lightning-mp carries only the last layer's output between stages."
                    " Point layers= at a container whose blocks carry everything forward."
                )

    def layers_started(self) -> bool:
        return bool(self._state.calls)

    def _make_order_guard(self, name: str):
        def guard(module: nn.Module, args: Any) -> None:
            if self._state.active and self.layers_started():
                raise ModelSplitError(
                    f"module '{name}' is registered before the layer container"
                    f" '{self.plan.layers.container_name}' but runs after it, so lightning-mp placed it on the first"
                    " stage although the last stage uses it. Register it after the layers in __init__ (the"
                    " registration order tells lightning-mp which modules run before and after the layers)."
                )

        return guard


class RemoteLayer(nn.Module):
    """Stand-in for a layer that lives on another stage. It keeps the original's structure readable: a skeleton of
    it on the meta device (no memory, not registered, so no parameter or state entry) answers every attribute the
    stand-in lacks, so model code that inspects a layer (``self.layers[0].self_attn.batch_first``, ``layer_idx``,
    ``attention_type``) keeps working."""

    is_stand_in = True  # what the planner checks to refuse a model already split

    def __init__(self, index: int, runtime: StageRuntime, original: nn.Module) -> None:
        super().__init__()
        self.index = index
        self._runtime = [runtime]  # lists, so nn.Module registers neither the runtime's modules nor the skeleton
        self._skeleton = [meta_skeleton(original)]
        self.original_class = type(original).__name__

    @property
    def skeleton(self) -> nn.Module:
        """The original layer's structure, parameters and buffers on the meta device."""
        return self._skeleton[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            skeleton = self.__dict__.get("_skeleton")
            if skeleton is None:
                raise
            return getattr(skeleton[0], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._runtime[0].remote_output(self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, original={self.original_class}"


class ZeroEmbedding(nn.Module):
    """Stand-in for an embedding of the first stage on a later stage: zeros of the right shape, no weight.

    Its output only feeds layers that live on earlier stages; the model still reads its shape and dtype (masks).
    """

    def __init__(self, original: nn.Embedding, name: str, runtime: StageRuntime) -> None:
        super().__init__()
        self.embedding_dim = original.embedding_dim
        self.num_embeddings = original.num_embeddings
        self.padding_idx = original.padding_idx
        self.dtype = original.weight.dtype
        self.name = name
        self.stage = runtime.stage
        self._runtime = [runtime]

    def forward(self, indices: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        runtime = self._runtime[0]
        if not runtime.plan.layers.observed and runtime.layers_started():  # placed by registration order: wrongly
            raise ModelSplitError(
                f"embedding '{self.name}' is registered before the layers but runs after them; register it after the"
                " layers in __init__, so that lightning-mp places it on the last stage."
            )
        zeros = torch.zeros(*indices.shape, self.embedding_dim, dtype=self.dtype, device=indices.device)
        if torch.is_grad_enabled():
            self._runtime[0].watch(self.name, zeros.requires_grad_())
        return zeros

    def __getattr__(self, name: str) -> Any:
        if name == "weight":
            raise ModelSplitError(
                f"the model reads '{self.name}.weight' on stage {self.stage}, but that embedding lives on the first"
                " stage. Tie it through a module instead (lm_head.weight = embedding.weight), so that lightning-mp"
                " keeps a copy where it is used."
            )
        return super().__getattr__(name)


class Unreachable(nn.Module):
    """Stand-in for a module after the layers on a stage whose forward ends before them."""

    def __init__(self, name: str, stage: int) -> None:
        super().__init__()
        self.name = name
        self.stage = stage

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelSplitError(
            f"module '{self.name}' is registered after the layers, so lightning-mp placed it on the last stage, but"
            f" stage {self.stage} ran it before its layers. Register it before the layer container in __init__."
        )


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device: its structure and plain
    attributes, without copying (or holding) any data."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _carries_grad(value: Any) -> bool:
    return any(t.requires_grad for t in flatten(value)[0])


def _call_then(module: nn.Module, after: Callable[[Any], Any]) -> None:
    """Make ``module(...)`` return ``after(output)``.

    Unlike a forward hook, this sees what the call returns to the model's code: wrappers such as Hugging Face's
    gradient checkpointing run forward hooks inside the checkpoint, where the output carries no autograd history.
    The module's class is swapped for a subclass of the same name, so ``isinstance`` checks still hold.
    """
    cls = type(module)

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return after(cls.__call__(self, *args, **kwargs))

    _swap_call(module, __call__)


def _checkpoint_when(module: nn.Module, runtime: StageRuntime, index: int) -> None:
    """Make layer ``index`` run under activation checkpointing (non-reentrant, RNG state preserved, so the numbers
    do not change) while ``runtime.checkpointing`` is set and it is one of every ``runtime.checkpoint_every`` own
    layers: its activations are recomputed in backward."""
    if _wrapped_by(module, "_checkpoint_when"):
        return
    cls = type(module)

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        chosen = (index - runtime.active.start) % runtime.checkpoint_every == 0
        if runtime.checkpointing and chosen and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(cls.__call__, self, *args, use_reentrant=False, **kwargs)
        return cls.__call__(self, *args, **kwargs)

    _swap_call(module, __call__)


def _run_when_active(module: nn.Module, runtime: StageRuntime, index: int) -> None:
    """With several (virtual) stages on a rank: layer ``index`` runs only in its own stage's forwards; in another
    stage's forward it stands in as a remote layer (the outermost wrapper, so nothing else of it runs)."""
    cls = type(module)

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if runtime._state.active and index not in runtime.active:
            return runtime.remote_output(index)
        return cls.__call__(self, *args, **kwargs)

    _swap_call(module, __call__)


def _swap_call(module: nn.Module, call: Callable[..., Any]) -> None:
    """Give ``module`` a subclass of its class, of the same name, whose ``__call__`` is ``call``."""
    cls = type(module)
    namespace = {"__call__": call, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    module.__class__ = type(cls.__name__, (cls,), namespace)


def _wrapped_by(module: nn.Module, wrapper: str) -> bool:
    """Whether ``module``'s class was last swapped by the function named ``wrapper``."""
    cls = type(module)
    return "__call__" in vars(cls) and getattr(cls.__call__, "__qualname__", "").startswith(wrapper + ".")


def _undo_call_then(module: nn.Module) -> None:
    """Undo :func:`_call_then` (no-op when the module was not wrapped)."""
    if _wrapped_by(module, "_call_then"):
        module.__class__ = type(module).__bases__[0]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _demote_parameters(module: nn.Module, needed: set[int]) -> list[Tensor]:
    """Turn the module's parameters that this stage does not own into plain tensors (not trained, not saved).

    Trainable ones keep ``requires_grad`` so that a gradient reaching them (a connection around the layers) can be
    detected; they are never stepped. Returns them.
    """
    demoted = []
    for pname, param in list(module._parameters.items()):
        if param is not None and id(param) not in needed:
            del module._parameters[pname]
            tensor = param.detach().requires_grad_(param.requires_grad)
            object.__setattr__(module, pname, tensor)
            demoted.append(tensor)
    return demoted

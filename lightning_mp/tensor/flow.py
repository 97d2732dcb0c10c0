"""The planner that follows a block's data flow: which projection feeds which, how its outputs are cut, and which
sizes the code reads.

Names and registration order say little about what a model computes: Phi-3 registers its output projection before
its fused q/k/v, GPT-NeoX interleaves q, k and v per head, T5 calls its output projection ``o``, a fused gate/up
layer is cut by ``chunk(2)``, litgpt reads its head counts from a config object every layer shares. So the plan of
each distinct block is read off one forward of the whole block on its real inputs (recorded by the self-check):

1. *Influence* (:func:`influence`). Every linear layer's output is cut from its input (a fresh leaf). For each
   layer ``B`` and each rank ``r``, a random gradient on the ``r``-th contiguous slice of ``B``'s input features
   (the slice a row-parallel ``B`` holds) is back-propagated to those leaves: the output features of a layer ``A``
   it reaches are the ones rank ``r`` needs of ``A``. Whatever the code does in between (views by heads, chunks,
   slices, transposes, attention), this is what it needs.
2. *Roles* (:func:`roles`). ``B`` is row-parallel when its input is made only of outputs of such layers, each
   feature of which reaches one rank's slice: those layers are column-parallel, each rank holding the features its
   slice needs, in their order (contiguous q/k/v parts, per-head interleaving, per-group layouts and ``chunk``-ed
   gate/up layers alike). A layer each of whose features reaches every rank (a key/value head shared by all query
   heads) is kept whole on every rank beside them. A layer whose output reaches the block's output other than
   through its row-parallel partner, or is needed by a layer reading the block's input, stays whole.
3. *Sizes* (:func:`sizes`). The block runs again with the integers it reads from its modules (and from the config
   objects they hold) tagged, and each element of the column-parallel outputs marked with the rank that holds it.
   An integer that sizes a dimension the split divides (a head count in a ``view``, a width in a ``split`` or a
   slice) must be divided per rank; one that sizes a dimension each rank holds whole (the head size) must not.
   A size read from a config object is set on a per-module copy of it (``plan.set_attributes``).

Names remain the fallback (no batch to observe, a block the observation fails on), and the self-check remains the
safety net: whatever is planned here is run split against whole before training.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.runtime.tree import tree_leaves
from lightning_mp.tensor.layers import is_linear_like, lora_parts
from lightning_mp.tensor.shard import Runs

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
Origin = tuple[str, str]  # (module, attribute path): ("self_attn", "num_heads"), ("attn", "config.n_head")


# ---- 1. influence -------------------------------------------------------------------------------------------------


@dataclass
class Influence:
    """What one forward of a block showed about its linear layers (named relative to the block)."""

    order: list[str] = field(default_factory=list)  # the layers in the order they were first called
    widths: dict[str, int] = field(default_factory=dict)  # output features
    reach: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # B -> A -> bool [rank, A's feature]
    from_input: set[str] = field(default_factory=set)  # layers whose input depends on the block's input directly
    leaks: set[str] = field(default_factory=set)  # layers whose output reaches the block's output directly
    repeated: set[str] = field(default_factory=set)  # layers called more than once


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linear-like layers of ``block`` to plan (a LoRA wrapper as one layer, not its inner layers)."""
    found: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        if name and is_linear_like(module) and not any(name.startswith(w + ".") for w in found):
            found[name] = module
    return {n: m for n, m in found.items() if lora_parts(m) is not None or not _inside_lora(n, found)}


def _inside_lora(name: str, found: dict[str, nn.Module]) -> bool:
    return any(name.startswith(w + ".") and lora_parts(m) is not None for w, m in found.items())


def hidden_states(inputs: Inputs) -> Tensor | None:
    """A block call's hidden states: its first positional tensor, or its ``hidden_states`` keyword."""
    args, kwargs = inputs
    if args and isinstance(args[0], Tensor):
        return args[0]
    found = kwargs.get("hidden_states")
    return found if isinstance(found, Tensor) else None


def _probes(x: Tensor, size: int) -> list[Tensor]:
    """One random gradient per rank, on that rank's contiguous slice of the last dim (``torch.chunk`` slices)."""
    n = x.shape[-1]
    chunk = -(-n // size)
    g = torch.Generator().manual_seed(4321)
    out = []
    for r in range(size):
        probe = torch.zeros(x.shape, dtype=x.dtype)
        probe[..., r * chunk : (r + 1) * chunk] = torch.randn(
            probe[..., r * chunk : (r + 1) * chunk].shape, generator=g
        )
        out.append(probe.to(x.device))
    return out


def _features_used(grad: Tensor | None) -> Tensor | None:
    if grad is None:
        return None
    used = grad.ne(0).reshape(-1, grad.shape[-1]).any(0)
    return used if bool(used.any()) else None


def influence(block: nn.Module, inputs: Inputs, size: int) -> Influence:
    """Run ``block`` on ``inputs`` (fp32, the hidden states requiring a gradient) and measure, for each linear layer,
    which output features of which other layer each rank's slice of its input needs (see the module docstring)."""
    linears = block_linears(block)
    seen: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}
    found = Influence()

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name in seen:
                found.repeated.add(name)
            elif args and isinstance(args[0], Tensor):
                seen[name] = args[0]
                found.order.append(name)

        return hook

    def after(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if not isinstance(out, Tensor):
                return None
            leaf = out.detach().requires_grad_(True)
            if name not in leaves:
                leaves[name], found.widths[name] = leaf, out.shape[-1]
            return leaf

        return hook

    handles = [h for n, m in linears.items() for h in (m.register_forward_pre_hook(before(n)),
                                                       m.register_forward_hook(after(n)))]  # fmt: skip
    try:
        with torch.enable_grad():
            out = block(*inputs[0], **inputs[1])
    finally:
        for h in handles:
            h.remove()
    sources = [t for t in [hidden_states(inputs)] if t is not None and t.requires_grad]
    names = list(leaves)
    targets = sources + [leaves[n] for n in names]
    for b in found.order:
        x = seen[b]
        if not x.requires_grad:
            continue
        for r, probe in enumerate(_probes(x, size)):
            grads = torch.autograd.grad(x, targets, probe, retain_graph=True, allow_unused=True)
            if any(_features_used(g) is not None for g in grads[: len(sources)]):
                found.from_input.add(b)
            for a, g in zip(names, grads[len(sources) :]):
                used = _features_used(g)
                if used is not None:
                    reach = found.reach.setdefault(b, {})
                    reach.setdefault(a, torch.zeros(size, used.numel(), dtype=torch.bool))[r] = used.cpu()
    outputs = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
    if outputs and names:
        g = torch.Generator().manual_seed(8765)
        loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in outputs)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        found.leaks = {n for n, g in zip(names, grads) if _features_used(g) is not None}
    return found


# ---- 2. roles -----------------------------------------------------------------------------------------------------


@dataclass
class BlockFlow:
    """The plan of one block read off its data flow (names relative to the block)."""

    styles: dict[str, str] = field(default_factory=dict)  # linear layer -> colwise | rowwise | replicated_kv
    runs: dict[str, Runs] = field(default_factory=dict)  # colwise layer -> each rank's runs of its output features
    whole: dict[str, str] = field(default_factory=dict)  # linear layers kept whole -> why
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> attribute path -> per rank
    sizes_problem: str | None = None  # why the sizes could not be read (the names' rules are used)


def _one_rank(reach: Tensor) -> bool:
    """Every feature that some rank needs is needed by exactly one rank."""
    counts = reach.sum(0)
    return bool((counts <= 1).all())


def _every_rank(reach: Tensor) -> bool:
    """Every feature that some rank needs is needed by every rank."""
    counts = reach.sum(0)
    return bool(((counts == 0) | (counts == reach.shape[0])).all())


def _runs(ranks: Tensor, size: int) -> Runs:
    """Each rank's (offset, length) runs of consecutive features it holds, in order."""
    out = []
    for r in range(size):
        runs: list[tuple[int, int]] = []
        for i in torch.nonzero(ranks == r).flatten().tolist():
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        out.append(tuple(runs))
    return tuple(out)


def _assignment(a: str, consumers: list[str], found: Influence) -> Tensor | None:
    """The rank of each output feature of ``a`` from what its consumers' slices need, or None when a feature is
    needed by several ranks or by none, or the consumers disagree."""
    ranks = torch.full((found.widths[a],), -1, dtype=torch.long)
    for b in consumers:
        reach = found.reach[b][a]
        mine = torch.where(reach.any(0), reach.float().argmax(0), torch.full_like(ranks, -1))
        if bool(((ranks >= 0) & (mine >= 0) & (ranks != mine)).any()):
            return None
        ranks = torch.where(ranks >= 0, ranks, mine)
    return ranks if bool((ranks >= 0).all()) else None


def _columns(found: Influence, rows: set[str], size: int, flow: BlockFlow) -> tuple[dict[str, Tensor], set[str]]:
    """Given the candidate row-parallel layers, the column-parallel layers (with each feature's rank) and the whole
    shared ones; the others are noted in ``flow.whole``."""
    columns: dict[str, Tensor] = {}
    shared: set[str] = set()
    for a in found.order:
        consumers = [b for b, sources in found.reach.items() if a in sources]
        if not consumers:
            continue
        why = None
        if a in found.leaks:
            why = "its output reaches the block's output without passing a row-parallel layer"
        elif a in found.repeated:
            why = "it is called more than once in one forward"
        elif any(b not in rows for b in consumers):
            why = f"its output feeds {next(b for b in consumers if b not in rows)}, which cannot be row-parallel"
        if why is None and all(_one_rank(found.reach[b][a]) for b in consumers):
            ranks = _assignment(a, consumers, found)
            if ranks is not None:
                columns[a] = ranks
                continue
            why = "its features are needed by different ranks' slices of its consumers"
        if why is None and all(_every_rank(found.reach[b][a]) for b in consumers):
            shared.add(a)
            continue
        flow.whole[a] = why or "some of its features are needed by several ranks' slices of its consumers"
    return columns, shared


def roles(found: Influence, size: int) -> BlockFlow:
    """Column-parallel, row-parallel and shared-whole layers from the influence (see the module docstring)."""
    flow = BlockFlow()
    rows = {b for b, sources in found.reach.items() if b not in found.from_input and b not in found.repeated}
    while True:
        flow.whole = {}
        columns, shared = _columns(found, rows, size, flow)
        keep = {b for b in rows if set(found.reach[b]) <= set(columns) | shared and set(found.reach[b]) & set(columns)}
        if keep == rows:
            break
        rows = keep
    for name in found.order:  # in the order the block calls them, the same in every process
        if name in columns:
            flow.styles[name], flow.runs[name] = "colwise", _runs(columns[name], size)
        elif name in shared or name in rows:
            flow.styles[name] = "replicated_kv" if name in shared else "rowwise"
    flow.whole = {n: why for n, why in flow.whole.items() if n not in flow.styles}
    for name in found.order:
        if name not in flow.styles:
            flow.whole.setdefault(name, "its input is the block's replicated input, and no row-parallel layer follows")
    return flow


# ---- 3. sizes -----------------------------------------------------------------------------------------------------


class _Tagged(int):
    """An integer read from a module or a config object, remembering where from through the arithmetic on it, as a
    sum of products of the attributes read (``n_head * head_size + 2 * n_query_groups * head_size``)."""

    terms: frozenset[frozenset[Origin]]

    def __new__(cls, value: int, terms: frozenset[frozenset[Origin]]) -> _Tagged:
        obj = super().__new__(cls, value)
        obj.terms = terms
        return obj

    @staticmethod
    def read(value: int, origin: Origin) -> _Tagged:
        return _Tagged(value, frozenset({frozenset({origin})}))

    def _combine(self, other: Any, fn: Callable[[Any, Any], Any], swap: bool, product: bool) -> Any:
        if not isinstance(other, int) or isinstance(other, bool):
            return fn(other, int(self)) if swap else fn(int(self), other)
        value = fn(int(other), int(self)) if swap else fn(int(self), int(other))
        theirs = getattr(other, "terms", frozenset({frozenset()}))
        # a product's terms multiply (a division counts as a factor too); a sum's add up
        terms = frozenset(a | b for a in self.terms for b in theirs) if product else self.terms | theirs
        return _Tagged(value, terms)

    def __mul__(self, o: Any) -> Any:
        return self._combine(o, operator.mul, False, True)

    def __rmul__(self, o: Any) -> Any:
        return self._combine(o, operator.mul, True, True)

    def __floordiv__(self, o: Any) -> Any:
        return self._combine(o, operator.floordiv, False, True)

    def __rfloordiv__(self, o: Any) -> Any:
        return self._combine(o, operator.floordiv, True, True)

    def __add__(self, o: Any) -> Any:
        return self._combine(o, operator.add, False, False)

    def __radd__(self, o: Any) -> Any:
        return self._combine(o, operator.add, True, False)

    def __sub__(self, o: Any) -> Any:
        return self._combine(o, operator.sub, False, False)

    def __rsub__(self, o: Any) -> Any:
        return self._combine(o, operator.sub, True, False)


def _config_like(value: Any) -> bool:
    """An object a module holds for its sizes (a config), not a module, tensor, function or builtin value."""
    plain = (nn.Module, Tensor, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    return hasattr(value, "__dict__") and not isinstance(value, plain) and type(value).__module__ != "builtins"


@contextlib.contextmanager
def _tagged_reads(block: nn.Module) -> Iterator[None]:
    """While inside: the public integer attributes the block's modules (and the config objects they hold) read come
    back tagged with the module and attribute path they were read through."""
    names = {id(m): n for n, m in block.named_modules()}
    running: list[nn.Module] = []
    holders: dict[int, list[tuple[str, str]]] = {}  # config id -> (module, attribute) holding it
    for name, module in block.named_modules():
        for attr, value in vars(module).items():
            if not attr.startswith("_") and _config_like(value):
                holders.setdefault(id(value), []).append((name, attr))
    configs = {id(v): v for m in block.modules() for v in vars(m).values() if id(v) in holders}

    def module_read(base: type) -> Callable:
        def read(self: Any, name: str) -> Any:
            value = base.__getattribute__(self, name)
            if type(value) is int and not name.startswith("_"):
                return _Tagged.read(value, (names[id(self)], name))
            return value

        return read

    def config_read(base: type) -> Callable:
        def read(self: Any, name: str) -> Any:
            value = base.__getattribute__(self, name)
            if type(value) is int and not name.startswith("_"):
                for module in reversed(running):  # the innermost running module that holds this object
                    held = [a for n, a in holders[id(self)] if n == names[id(module)]]
                    if held:
                        return _Tagged.read(value, (names[id(module)], f"{held[0]}.{name}"))
            return value

        return read

    swapped: list[tuple[Any, type]] = []
    handles = []
    try:
        for obj, reader in [(m, module_read) for m in block.modules()] + [(c, config_read) for c in configs.values()]:
            base = type(obj)
            obj.__class__ = type(base.__name__, (base,), {"__getattribute__": reader(base)})
            swapped.append((obj, base))

        def enter(module: nn.Module, args: Any) -> None:
            running.append(module)

        def leave(module: nn.Module, args: Any, out: Any) -> None:
            running.pop()

        for module in block.modules():
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        yield
    finally:
        for h in handles:
            h.remove()
        for obj, base in swapped:
            obj.__class__ = base


_SHAPE_OPS = {
    "view", "reshape", "view_as", "reshape_as", "transpose", "permute", "contiguous", "clone", "chunk", "split",
    "split_with_sizes", "unbind", "__getitem__", "narrow", "flatten", "unflatten", "unsqueeze", "squeeze", "expand",
    "expand_as", "movedim", "moveaxis", "swapaxes", "swapdims", "repeat_interleave", "repeat", "cat", "concat",
    "concatenate", "stack", "t", "detach",
}  # fmt: skip
_SIZED_OUTPUT = {"view", "reshape", "expand"}  # their integer arguments size the output's dims, in order


def _varies(shadow: Tensor, dim: int) -> bool:
    """The ranks marked on ``shadow`` differ along ``dim``: the split divides that dimension."""
    if shadow.dim() == 0 or shadow.shape[dim] < 2:
        return False
    return bool((shadow.amax(dim) != shadow.amin(dim)).any())


def _flat(values: Any) -> list[Any]:
    if isinstance(values, (tuple, list, torch.Size)):
        return [x for v in values for x in _flat(v)]
    return [values]


class _RankMarks(TorchFunctionMode):
    """Carries, beside each tensor made from column-parallel outputs, the rank holding each element (-1: whole),
    and records which tagged integers size divided dimensions (``divided``) and which undivided ones (``whole``)."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.divided: list[frozenset[frozenset[Origin]]] = []  # the terms of each integer sizing a divided dim
        self.whole: set[Origin] = set()

    def __torch_function__(self, func: Any, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        marked = [t for t in _flat(list(args) + list(kwargs.values())) if isinstance(t, Tensor) and t in self.marks]
        if marked:
            with contextlib.suppress(Exception):  # an op the marks cannot follow leaves its result unmarked
                self._follow(getattr(func, "__name__", ""), args, kwargs, out, marked)
        return out

    def _shadow(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            mark = self.marks.get(value)
            return mark if mark is not None else torch.full(value.shape, -1, dtype=torch.int8, device=value.device)
        if isinstance(value, (tuple, list)):
            return type(value)(self._shadow(v) for v in value)
        return value

    def _follow(self, name: str, args: tuple, kwargs: dict, out: Any, marked: list[Tensor]) -> None:
        if name in _SHAPE_OPS:
            shadow = func_on(name, self._shadow(args), self._shadow(kwargs))
            self._note_sizes(name, args, kwargs, shadow)
            for t, s in zip(_flat(out), _flat(shadow)):
                if isinstance(t, Tensor) and isinstance(s, Tensor) and t.shape == s.shape:
                    self.marks[t] = s
            return
        if not isinstance(out, Tensor):
            return
        if name in ("matmul", "__matmul__", "bmm", "scaled_dot_product_attention"):
            operands = [a for a in args if isinstance(a, Tensor)][: 3 if name.startswith("scaled") else 2]
            self.marks[out] = _matmul_marks(out, [self._shadow(t) for t in operands])
            return
        shadows = []
        for t in marked:
            with contextlib.suppress(RuntimeError):
                shadows.append(self.marks[t].broadcast_to(out.shape))
        if shadows:
            self.marks[out] = torch.stack(shadows).amax(0) if len(shadows) > 1 else shadows[0]

    def _note_sizes(self, name: str, args: tuple, kwargs: dict, shadow: Any) -> None:
        """Record the tagged integers of a shape op by whether the dimension they size is divided."""
        source = self._shadow(args[0]) if args and isinstance(args[0], Tensor) else None
        uses: list[tuple[Any, Tensor, int]] = []  # (integer, marks, dim)
        if name in _SIZED_OUTPUT and isinstance(shadow, Tensor):
            uses = [(v, shadow, d) for d, v in enumerate(_flat(args[1:]))]
        elif name in ("split", "split_with_sizes", "narrow") and source is not None:
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) if name != "narrow" else args[1]
            sizes = _flat(args[1]) if name != "narrow" else list(args[2:4])
            uses = [(v, source, int(dim)) for v in sizes]
        elif name == "__getitem__" and source is not None:
            uses = _index_uses(args[1], source)
        for value, marks, dim in uses:
            if isinstance(value, _Tagged):
                if _varies(marks, dim):
                    self.divided.append(value.terms)
                else:
                    self.whole |= {origin for term in value.terms for origin in term}


def func_on(name: str, args: Any, kwargs: dict) -> Any:
    """Apply the shape op ``name`` to the marks standing in for its tensors."""
    if name in ("cat", "concat", "concatenate", "stack"):
        return getattr(torch, name)(*args, **kwargs)
    return getattr(args[0], name)(*args[1:], **kwargs)


def _index_uses(index: Any, marks: Tensor) -> list[tuple[Any, Tensor, int]]:
    """The slice bounds of an index, with the dimension each applies to."""
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        before, after = items[:at], items[at + 1 :]
        dims = list(range(len(before))) + list(range(marks.dim() - len(after), marks.dim()))
        items = before + after
    else:
        dims = list(range(len(items)))
    uses = []
    for item, dim in zip(items, dims):
        if item is None:
            return []  # new dimensions shift the rest: not followed
        if isinstance(item, slice):
            uses += [(v, marks, dim) for v in (item.start, item.stop) if v is not None]
    return uses


def _matmul_marks(out: Tensor, shadows: list[Tensor]) -> Tensor:
    """The marks of ``a @ b`` (or attention ``softmax(q @ k^T) @ v``): an output element is held by the rank of the
    row of ``a`` and the column of ``b`` (of ``q`` and ``v``) it combines."""
    a, b = shadows[0], shadows[-1]
    rows = a.amax(-1, keepdim=True)
    try:
        return torch.maximum(rows, b.amax(-2, keepdim=True)).broadcast_to(out.shape).clone()
    except RuntimeError:  # grouped-query attention: fewer key/value heads than query heads
        return rows.broadcast_to(out.shape).clone()


def sizes(block: nn.Module, inputs: Inputs, flow: BlockFlow, size: int, name: str = "the block") -> None:
    """Fill ``flow.attributes``: the per-rank value of each integer the block reads that sizes a divided dimension
    (see the module docstring); ``flow.sizes_problem`` says why not, when they cannot be told apart.

    Raises:
        ModelSplitError: such an integer does not divide by ``size``.
    """
    modules = dict(block.named_modules())
    mode = _RankMarks()
    handles = []
    for name, runs in flow.runs.items():

        def mark(module: nn.Module, args: tuple, out: Any, runs: Runs = runs) -> None:
            if isinstance(out, Tensor):
                ranks = torch.empty(out.shape[-1], dtype=torch.int8)
                for r, pieces in enumerate(runs):
                    for offset, length in pieces:
                        ranks[offset : offset + length] = r
                mode.marks[out] = ranks.to(out.device).expand(out.shape).clone()

        handles.append(modules[name].register_forward_hook(mark))
    try:
        with torch.no_grad(), _tagged_reads(block), mode:
            block(*inputs[0], **inputs[1])
    finally:
        for h in handles:
            h.remove()
    divided: set[Origin] = set()
    for terms in mode.divided:  # in each term of a divided size, exactly one factor is divided
        for term in terms:
            left = term - mode.whole
            if len(left) != 1:
                flow.sizes_problem = f"a divided size is read as a product of {sorted(term)}, {len(left)} may change"
                return
            divided |= left
    for module_name, path in sorted(divided):
        value = _read(modules[module_name], path)
        if value % size:
            raise ModelSplitError(
                f"{name}.{module_name + '.' if module_name else ''}{path} = {value} sizes what tensor parallelism"
                f" splits, but does not divide by tensor_parallel_size={size}: use a tensor_parallel_size that"
                f" divides {value}, or keep the block whole with tensor_parallel_plan {{'{name}': 'replicate'}}."
            )
        flow.attributes.setdefault(module_name, {})[path] = value // size


def _read(module: nn.Module, path: str) -> int:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return int(obj)


def observe_block(block: nn.Module, inputs: Inputs, size: int, name: str = "the block") -> BlockFlow:
    """The data-flow plan of ``block``, run on ``inputs`` (fp32 copies; see the module docstring)."""
    found = influence(copy.deepcopy(block), inputs, size)
    flow = roles(found, size)
    if flow.runs:
        sizes(copy.deepcopy(block), _without_grad(inputs), flow, size, name)
    return flow


def _without_grad(inputs: Inputs) -> Inputs:
    args, kwargs = inputs
    strip = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
    return tuple(strip(a) for a in args), {k: strip(v) for k, v in kwargs.items()}


# ---- the whole model ----------------------------------------------------------------------------------------------


def block_groups(root: nn.Module, container: str, chosen: set[str]) -> list[list[str]]:
    """The container's blocks, grouped when alike (same class, same parameter shapes): one observation plans a group.
    Blocks holding a module the user's plan placed are left to that plan."""
    modules = dict(root.named_modules())
    groups: dict[tuple, list[str]] = {}
    holder = modules.get(container) if container else None
    for child, module in holder.named_children() if holder is not None else []:
        name = f"{container}.{child}"
        if any(n == name or n.startswith(name + ".") for n in chosen):
            continue
        key = (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))
        groups.setdefault(key, []).append(name)
    return list(groups.values())

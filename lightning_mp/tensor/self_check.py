"""The tensor-parallel self-check: a plan that would train to different numbers is refused before the first step.

No rule about names or structure is right on every model (a fused projection laid out per head, a norm applied per
head, a subclass's extra scaling ...), so the plan is tried on the model itself. At set-up every rank runs one real
micro-batch of the user's step with hooks that record the inputs of the modules to check; then each distinct
planned block (one per block class and plan; a block whose column-parallel result leaves it is checked together
with the blocks up to its row-parallel partner), and the split embedding and LM head, run twice on those inputs,
in fp32: a copy kept whole, and a copy split by the plan restricted to it over the real tensor-parallel group.
Outputs, input gradients and parameter gradients (the split ones gathered whole) must agree within
:data:`RTOL` of their magnitude.

A whole-kept parameter whose gradient on each rank is that rank's part (a per-head norm after a column-parallel
projection) is not an error: when the ranks' gradients sum to the whole one, the parameter joins the gradients
summed over the group (``TensorParallelPlan.partial``). Anything else that differs either refuses to train
(:class:`ModelSplitError` naming the module, the rule that split it, the size of the difference and the
``tensor_parallel_plan`` entry that keeps it whole) or, with ``tensor_parallel_check="fallback"``, keeps that module
whole with one warning. Every rank runs the same checks in the same order; the verdicts are reduced over the whole
world, so all ranks decide alike.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.runtime.tree import tree_leaves, tree_map
from lightning_mp.tensor.plan import (
    TensorParallelPlan,
    apply_tensor_parallel,
    check_sequence_parallel,
    follow_data_flow,
)
from lightning_mp.tensor.shard import TPGroup, gather_full

CheckMode = Literal["error", "fallback", "off"]
CHECK_MODES = ("error", "fallback", "off")
RTOL = 1e-4  # of the largest magnitude of the whole module's tensor
ATOL = 1e-5
Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class Target:
    """Modules checked together, and those the verdict stands for (later blocks of the same class and plan)."""

    members: list[str]  # run one after the other: one block, or an open block and those up to its row-wise partner
    covers: list[list[str]]  # every run of modules this verdict applies to, ``members`` first
    rule: str  # how the plan splits the members, for messages
    kind: str = ""  # the members' classes, for messages

    @property
    def name(self) -> str:
        return self.members[0] if len(self.members) == 1 else f"{self.members[0]} .. {self.members[-1]}"


@dataclass
class Verdict:
    """What one target's check found (the same on every rank)."""

    target: Target
    worst: str = ""  # the quantity that differed most: "output", "input gradient", "gradient of <param>"
    excess: float = 0.0  # its difference over the tolerance (> 1: a mismatch)
    diff: float = 0.0  # max |split - whole|
    scale: float = 0.0  # max |whole|
    partial: list[str] = field(default_factory=list)  # whole-kept parameters whose gradient is a per-rank part
    raised: str | None = None  # the split module's forward or backward raised this

    @property
    def ok(self) -> bool:
        return self.excess <= 1.0


@dataclass
class CheckReport:
    """The self-check's result, as the plan report shows it."""

    mode: str
    seconds: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)
    skipped: str | None = None  # why nothing was checked

    def format(self) -> str:
        if self.skipped:
            return f"    self-check: skipped ({self.skipped})"
        bad = [v.target.name for v in self.verdicts if not v.ok]
        partial = sum(len(v.partial) for v in self.verdicts)
        text = f"    self-check: {len(self.verdicts)} split modules match whole on a real micro-batch"
        if bad:
            text = (
                f"    self-check: {len(bad)} of {len(self.verdicts)} split modules differ, kept whole: {', '.join(bad)}"
            )
        if partial:
            text += f"; {partial} whole parameters' gradients summed over the ranks"
        return text + f" ({self.seconds:.2f} s)"


# ---- what to check --------------------------------------------------------------------------------------------


def restrict(plan: TensorParallelPlan, prefix: str) -> TensorParallelPlan:
    """The part of ``plan`` for module ``prefix`` and what it holds, named relative to it."""

    def inside(name: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    def rel(name: str) -> str:
        return name[len(prefix) + 1 :] if name != prefix else ""

    return TensorParallelPlan(
        plan.size,
        styles={rel(n): s for n, s in plan.styles.items() if inside(n)},
        parts={rel(n): p for n, p in plan.parts.items() if inside(n)},
        runs={rel(n): r for n, r in plan.runs.items() if inside(n)},
        attributes={rel(n): dict(a) for n, a in plan.attributes.items() if inside(n)},
        source=plan.source,
    )


def _signature(module: nn.Module, plan: TensorParallelPlan) -> tuple:
    attributes = tuple(sorted((n, tuple(sorted(a.items()))) for n, a in plan.attributes.items()))
    runs = tuple(sorted(plan.runs.items()))
    return type(module), tuple(sorted(plan.styles.items())), tuple(sorted(plan.parts.items())), runs, attributes


def _is_open(plan: TensorParallelPlan) -> bool:
    """Column-parallel layers without a row-parallel one: the block hands its successor a per-rank part."""
    styles = set(plan.styles.values())
    return bool(styles & {"colwise", "replicated_kv"}) and "rowwise" not in styles


def _rule(plan: TensorParallelPlan) -> str:
    styles = [f"{n or 'itself'} {s}" for n, s in plan.styles.items()]
    shown = ", ".join(styles[:4]) + (f" and {len(styles) - 4} more" if len(styles) > 4 else "")
    return f"the {plan.source} plan ({shown})"


def _chain_rule(run: list[str], subplans: list[TensorParallelPlan]) -> str:
    """The rule of a run of blocks, each layer named from its block's own name (``1.mlp.fc``)."""
    styles = {f"{m.rpartition('.')[2]}.{n}".rstrip("."): s for m, p in zip(run, subplans) for n, s in p.styles.items()}
    return _rule(TensorParallelPlan(subplans[0].size, styles=styles, source=subplans[0].source))


def plan_targets(root: nn.Module, plan: TensorParallelPlan) -> list[Target]:
    """The distinct pieces of ``plan`` to check: runs of blocks of the container, then each split module outside."""
    modules = dict(root.named_modules())
    found: dict[tuple, Target] = {}

    def add(run: list[str]) -> None:
        subplans = [restrict(plan, m) for m in run]
        key = tuple(_signature(modules[m], p) for m, p in zip(run, subplans))
        if key in found:
            found[key].covers.append(run)
        else:
            rule = _rule(subplans[0]) if len(run) == 1 else _chain_rule(run, subplans)
            found[key] = Target(run, [run], rule, " + ".join(type(modules[m]).__name__ for m in run))

    container = modules.get(plan.container) if plan.container else None
    if container is not None:
        run: list[str] = []
        for child in container.named_children():
            name = f"{plan.container}.{child[0]}"
            sub = restrict(plan, name)
            if not sub.styles and not run:
                continue
            run.append(name)
            if not _is_open(sub):
                add(run)
                run = []
        if run:
            add(run)
    prefix = plan.container + "." if plan.container else None
    for name in plan.styles:
        if name in modules and not (prefix and name.startswith(prefix)):
            add([name])
    return list(found.values())


# ---- the inputs -----------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised from a hook once every wanted input is recorded: the rest of the step need not run."""


def _detached(obj: Any) -> Any:
    return tree_map(lambda t: t.detach().clone(), obj)


@contextlib.contextmanager
def _left_as_found(root: nn.Module) -> Iterator[None]:
    """Buffers, train/eval flags and random states as they were: the capture leaves no trace on training."""
    buffers = {n: b.detach().clone() for n, b in root.named_buffers()}
    training = {m: m.training for m in root.modules()}
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for m, flag in training.items():
            m.training = flag
        with torch.no_grad():
            for n, b in root.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


def capture_inputs(root: nn.Module, names: list[str], step: Callable[[], Any]) -> tuple[dict[str, Inputs], str | None]:
    """The positional and keyword inputs of the first call of each module in ``names`` during ``step`` (in eval
    mode, without gradients; stopped as soon as all are recorded), and what went wrong if the step raised."""
    modules = dict(root.named_modules())
    captured: dict[str, Inputs] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in captured:
                captured[name] = (_detached(args), _detached(kwargs))
            if len(captured) == len(names):
                raise _Captured

        return hook

    handles = [modules[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in names]
    problem = None
    try:
        with _left_as_found(root), torch.no_grad():
            root.eval()
            step()
    except _Captured:
        pass
    except Exception as err:  # the user's step: training will show it; the check uses what it recorded
        problem = f"{type(err).__name__}: {err}"
    finally:
        for h in handles:
            h.remove()
    return captured, problem


# ---- running a module whole and split -------------------------------------------------------------------------


def _float_inputs(inputs: Inputs, device: torch.device) -> Inputs:
    """The inputs in fp32 on ``device``; the hidden states (a first positional tensor, else a ``hidden_states``
    keyword) require a gradient. The other inputs (rotary tables, masks, biases) are constants here: one that needs
    a gradient in training is checked through the parameters it comes from."""

    def prepare(t: Tensor, hidden: bool) -> Tensor:
        t = t.detach().to(device).clone()  # each run its own leaves
        if t.is_floating_point():
            t = t.float()
            if hidden and bool(torch.isfinite(t).all()):
                t.requires_grad_(True)
        return t

    args, kwargs = inputs
    first = bool(args) and isinstance(args[0], Tensor)
    args = tuple(prepare(a, i == 0) if isinstance(a, Tensor) else tree_map(lambda t: prepare(t, False), a)
                 for i, a in enumerate(args))  # fmt: skip
    kwargs = {k: tree_map(lambda t, k=k: prepare(t, k == "hidden_states" and not first), v) for k, v in kwargs.items()}
    return args, kwargs


def _grad_leaves(inputs: Inputs) -> list[Tensor]:
    return [t for t in tree_leaves(inputs) if t.requires_grad]


def _with_hidden(inputs: Inputs, hidden: Tensor) -> Inputs:
    """A later block's recorded inputs with the previous block's output in place of its hidden states."""
    args, kwargs = inputs
    if args and isinstance(args[0], Tensor):
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_tensor(out: Any) -> Tensor:
    leaves = tree_leaves(out)
    if not leaves:
        raise ValueError(f"the module returned no tensor ({type(out).__name__})")
    return leaves[0]


def _run_chain(chain: list[nn.Module], inputs: list[Inputs]) -> tuple[list[Tensor], list[Tensor]]:
    """Run ``chain`` on ``inputs`` (each later member gets the previous one's output as hidden states) and
    back-propagate a fixed random projection of the outputs; returns (floating outputs, input leaves)."""
    first = inputs[0]
    out: Any = None
    for i, (module, recorded) in enumerate(zip(chain, inputs)):
        args, kwargs = first if i == 0 else _with_hidden(recorded, _first_tensor(out))
        out = module(*args, **kwargs)
    outputs = [t for t in tree_leaves(out) if t.is_floating_point()]
    loss = None
    for i, t in enumerate(outputs):
        if t.requires_grad:
            g = torch.Generator().manual_seed(1234 + i)
            term = (t * torch.randn(t.shape, generator=g).to(t.device)).sum()
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    return [t.detach() for t in outputs], _grad_leaves(first)


def _excess(got: Tensor | None, want: Tensor | None) -> tuple[float, float, float]:
    """(max |got - want| over the tolerance, max |got - want|, max |want|); a missing or misshapen tensor is inf."""
    if want is None and got is None:
        return 0.0, 0.0, 0.0
    if want is None or got is None:
        present = want if want is not None else got
        if present is not None and not bool(present.abs().max() > 0):
            return 0.0, 0.0, 0.0  # a zero gradient and no gradient are the same
        return float("inf"), float("inf"), 0.0
    if got.shape != want.shape:
        return float("inf"), float("inf"), float(want.abs().max()) if want.numel() else 0.0
    if not want.numel():
        return 0.0, 0.0, 0.0
    diff = float((got.float() - want.float()).abs().max())
    scale = float(want.abs().max())
    return diff / (ATOL + RTOL * scale), diff, scale


def _worst(results: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return max(results, key=lambda r: r[0]) if results else (0.0, 0.0, 0.0)


@dataclass
class _Measured:
    """The numbers one rank found for a target; reduced (max) over the world, then judged."""

    labels: list[str]
    values: list[tuple[float, float, float]]  # per label: (excess, diff, scale)
    partial_candidates: list[str]  # the whole parameters behind the "summed:" labels


def _compare(
    whole: list[nn.Module], split: list[nn.Module], states: list[Any], outputs: tuple[list[Tensor], list[Tensor]],
    split_outputs: tuple[list[Tensor], list[Tensor]] | None, tp: TPGroup,
) -> _Measured:  # fmt: skip
    """Every quantity of the split run against the whole one, in an order that is the same on every rank (the
    gathers and sums are collectives of the tp group, run even when the split run raised)."""
    raised = split_outputs is None
    got_out, got_in = split_outputs if split_outputs is not None else ([], [])
    want_out, want_in = outputs
    m = _Measured(["output", "input gradient"], [], [])
    if raised:
        m.values += [(float("inf"),) * 2 + (0.0,), (0.0, 0.0, 0.0)]
    else:
        same = len(got_out) == len(want_out)
        m.values.append(_worst([_excess(a, b) for a, b in zip(got_out, want_out)]) if same else (float("inf"),) * 3)
        m.values.append(_worst([_excess(a.grad, b.grad) for a, b in zip(got_in, want_in)]))
    for i, (w, s, state) in enumerate(zip(whole, split, states)):
        split_params = dict(s.named_parameters())
        for pname, p in w.named_parameters():
            label = f"{pname}" if len(whole) == 1 else f"[{i}].{pname}"
            q = split_params[pname]
            grad = q.grad if q.grad is not None and not raised else torch.zeros_like(q)
            spec = state.specs.get(pname) if state is not None else None
            if spec is not None:
                m.labels.append(f"gradient of {label}")
                m.values.append(_excess(gather_full(grad, tp, spec), p.grad) if p.requires_grad else (0.0,) * 3)
                continue
            summed = grad.detach().clone()
            dist.all_reduce(summed, group=tp.group)
            if pname in (state.partial_grads if state is not None else []):
                m.labels.append(f"gradient of {label}")
                m.values.append(_excess(summed, p.grad) if p.requires_grad else (0.0,) * 3)
                continue
            m.labels += [f"gradient of {label}", f"summed:{label}"]
            local = None if raised else q.grad
            m.values += [_excess(local, p.grad), _excess(summed, p.grad)] if p.requires_grad else [(0.0,) * 3] * 2
            m.partial_candidates.append(pname if len(whole) == 1 else f"{i}:{pname}")
    return m


def _judge(target: Target, m: _Measured, reduced: Tensor, raised: str | None) -> Verdict:
    """The verdict from the world's maxima: a whole parameter whose own gradient differs but whose ranks' sum does
    not is a partial gradient, not a mismatch."""
    values = reduced.view(-1, 3).tolist()
    verdict = Verdict(target)
    candidates = iter(m.partial_candidates)
    worst: tuple[float, str, float, float] = (0.0, "", 0.0, 0.0)
    i = 0
    while i < len(m.labels):
        label, (excess, diff, scale) = m.labels[i], values[i]
        if i + 1 < len(m.labels) and m.labels[i + 1].startswith("summed:"):
            candidate = next(candidates)
            summed = values[i + 1]
            if excess > 1.0 and summed[0] <= 1.0:
                verdict.partial.append(candidate)
                excess = 0.0
            i += 1
        if excess > worst[0] and worst[0] <= 1.0:  # the first mismatch in order (output, input gradient, ...)
            worst = (excess, label, diff, scale)
        i += 1
    verdict.excess, verdict.worst, verdict.diff, verdict.scale = worst
    verdict.raised = raised
    return verdict


def check_target(
    root: nn.Module, plan: TensorParallelPlan, target: Target, inputs: list[Inputs], tp: TPGroup, device: torch.device
) -> Verdict:
    """Run ``target``'s modules whole and split on ``inputs``; the verdict is the same on every rank of the world."""
    modules = dict(root.named_modules())
    whole = [copy.deepcopy(modules[n]).float().to(device).eval() for n in target.members]
    split = [copy.deepcopy(w) for w in whole]
    outputs = _run_chain(whole, [_float_inputs(x, device) for x in inputs])
    states: list[Any] = [None] * len(split)
    raised = None
    split_outputs = None
    try:
        states = [apply_tensor_parallel(s, restrict(plan, n), tp) for s, n in zip(split, target.members)]
        split_outputs = _run_chain(split, [_float_inputs(x, device) for x in inputs])
    except Exception as err:  # a plan that does not fit the module is a mismatch to report, like wrong numbers
        raised = f"{type(err).__name__}: {err}"
    measured = _compare(whole, split, states, outputs, split_outputs, tp)
    reduced = torch.tensor([x for v in measured.values for x in v], dtype=torch.float64)
    reduced = torch.nan_to_num(reduced, nan=float("inf"), posinf=float("inf")).to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return _judge(target, measured, reduced.cpu(), raised)


# ---- the whole check ------------------------------------------------------------------------------------------


def self_check(
    root: nn.Module, plan: TensorParallelPlan, tp: TPGroup, step: Callable[[], Any] | None, mode: str,
    device: torch.device, no_step: str | None = None,
) -> CheckReport:  # fmt: skip
    """Re-plan the blocks from their observed data flow (``tensor.flow``; whatever ``mode``, when there is a step),
    then check every distinct piece of ``plan`` on ``root`` (the whole model, not yet split) and update ``plan``:
    partial gradients found are added to ``plan.partial``; with ``mode="fallback"`` a mismatching piece is kept
    whole. ``step`` runs the user's step on one micro-batch (None when there is none: ``no_step`` says why, and
    the check is skipped with a warning). A collective of the whole world: every rank calls it.

    Raises:
        ModelSplitError: with ``mode="error"``, a piece whose split run differs from its whole run.
    """
    start = time.perf_counter()
    report = CheckReport(mode)
    if step is not None and not any(p.is_meta for p in root.parameters()):
        plan_by_data_flow(root, plan, tp, step, device)
    if mode == "off":
        return report
    targets = plan_targets(root, plan)
    if any(p.is_meta for p in root.parameters()):
        report.skipped = "the model is on the meta device: nothing to run before each rank materializes its part"
    elif targets:
        report.skipped = _check_all(root, plan, tp, step, device, targets, report, no_step)
    report.seconds = time.perf_counter() - start
    if report.skipped and targets:
        warnings.warn(
            f"lightning-mp: the tensor-parallel self-check is skipped ({report.skipped}), so a plan that computes"
            " different numbers would not be caught: give the trainer a dataloader with at least one batch.",
            stacklevel=2,
        )
    _act(plan, report)
    plan.check = report.format()
    return report


def plan_by_data_flow(
    root: nn.Module, plan: TensorParallelPlan, tp: TPGroup, step: Callable[[], Any], device: torch.device
) -> None:
    """Re-plan the blocks from their observed data flow (``tensor.flow``), the same on every rank.

    Raises:
        ModelSplitError: a size the split divides does not divide, or the ranks observed different plans (their
            first batches differ in a way that changes what the blocks compute).
    """
    plan.flow = follow_data_flow(
        root, plan, lambda names: capture_inputs(root, names, step)[0], lambda x: _float_inputs(x, device), device
    )
    if plan.sequence_parallel:
        check_sequence_parallel(plan, dict(root.named_modules()), plan.container + ".")
    text = json.dumps(plan.to_dict(), sort_keys=True, default=str)
    digest = int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)
    seen = torch.tensor([digest, -digest], dtype=torch.float64, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    if int(seen[0]) != -int(seen[1]):
        raise ModelSplitError(
            "the tensor-parallel plan read off the blocks' data flow differs between ranks (their first batches make"
            " the blocks compute differently): give the layers' styles in tensor_parallel_plan."
        )


def _check_all(
    root: nn.Module, plan: TensorParallelPlan, tp: TPGroup, step: Callable[[], Any] | None, device: torch.device,
    targets: list[Target], report: CheckReport, no_step: str | None,
) -> str | None:  # fmt: skip
    """Capture the inputs and check each target; returns why it was skipped, if it was."""
    wanted = [n for t in targets for n in t.members]
    captured, problem = capture_inputs(root, wanted, step) if step is not None else ({}, no_step or "no batch")
    have = torch.tensor([all(n in captured for n in t.members) for t in targets], dtype=torch.float32).to(device)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if not bool(have.any()):
        return f"no inputs recorded: {problem or 'the step called none of the split modules'}"
    for target, ok in zip(targets, have.tolist()):
        if ok:
            report.verdicts.append(check_target(root, plan, target, [captured[n] for n in target.members], tp, device))
    return None


def _act(plan: TensorParallelPlan, report: CheckReport) -> None:
    """Partial gradients join ``plan.partial``; a mismatch refuses (mode "error") or is kept whole ("fallback")."""
    bad = [v for v in report.verdicts if not v.ok]
    for verdict in report.verdicts:
        for run in verdict.target.covers:
            for candidate in verdict.partial:
                index, _, pname = candidate.rpartition(":")
                plan.partial.add(f"{run[int(index) if index else 0]}.{pname}")
    if not bad:
        return
    if report.mode == "error":
        raise ModelSplitError(mismatch_message(plan, bad[0]))
    warnings.warn(
        "lightning-mp: the tensor-parallel self-check keeps these modules whole, whose split run differs from the"
        f" whole one: {'; '.join(_difference(v) for v in bad)}.",
        stacklevel=3,
    )
    for verdict in bad:
        keep_whole(plan, verdict)
    if plan.sequence_parallel:
        raise ModelSplitError(
            f"tensor_parallel_check='fallback' keeps {bad[0].target.name} whole, but sequence_parallel=True needs every"
            " projection inside the blocks split: set sequence_parallel=False, or fix the plan (see the warning)."
        )


def _difference(v: Verdict) -> str:
    if v.raised:
        return f"{v.target.name} raised {v.raised}"
    return f"{v.target.name}: {v.worst} differs by {v.diff:.3g} where the whole values reach {v.scale:.3g}"


def fix_pattern(plan: TensorParallelPlan, target: Target) -> str:
    """The ``tensor_parallel_plan`` pattern that keeps ``target`` (and the blocks like it) whole."""
    prefix = plan.container + "."
    if plan.container and target.members[0].startswith(prefix):
        return prefix + "*"
    return target.members[0]


def mismatch_message(plan: TensorParallelPlan, v: Verdict) -> str:
    """The refusal: the module, the rule that split it, the size of the difference, and the fix."""
    if v.raised:
        what = f"fails when split ({v.raised}) though it runs whole"
    else:
        what = (
            f"computes a different {v.worst} split than whole on a real micro-batch: max |split - whole| ="
            f" {v.diff:.3g} where the whole values reach {v.scale:.3g} (tolerance {RTOL:g} of that), so training"
            " would be silently wrong"
        )
    pattern = fix_pattern(plan, v.target)
    return (
        f"tensor-parallel self-check: {v.target.name} ({v.target.kind}), split by {v.target.rule}, {what}. Keep it"
        f" whole with tensor_parallel_plan={{{pattern!r}: 'replicate'}} (tensor_parallel_check='fallback' does so"
        " automatically), or give its layers' styles in tensor_parallel_plan."
    )


def keep_whole(plan: TensorParallelPlan, verdict: Verdict) -> None:
    """Remove every module the verdict covers from ``plan`` (a vocabulary split goes for the embedding and the head
    together: they may share their weight)."""
    why = f"self-check: split differs from whole ({_difference(verdict)})"
    names = [n for run in verdict.target.covers for n in run]
    if any(plan.styles.get(n) in ("vocab", "head") for n in names):
        names += [n for n, s in plan.styles.items() if s in ("vocab", "head")]
    for prefix in names:
        inside = [n for n in plan.styles if n == prefix or n.startswith(prefix + ".")]
        for name in inside:
            del plan.styles[name]
            plan.parts.pop(name, None)
            plan.runs.pop(name, None)
            plan.replicated[name] = why
        for name in [n for n in plan.attributes if n == prefix or n.startswith(prefix + ".")]:
            del plan.attributes[name]
        plan.partial = {p for p in plan.partial if not p.startswith(prefix + ".")}

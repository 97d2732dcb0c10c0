"""Planning tensor parallelism for a model nobody wrote a plan for.

:func:`plan_tensor_parallel` decides, module by module, how each weight is split (see ``tensor.layers``):

1. inside the blocks the pipeline splits (the layer container), projections are recognised by their names and their
   place: attention q/k/v (separate or fused, as GPT-2's ``c_attn``) and MLP up/gate/fc1 column-wise, the attention
   output and MLP down/fc2 row-wise; an ``nn.Sequential`` MLP (Linear, activation, Linear) likewise. A Hugging Face
   model's own ``base_model_tp_plan`` is used where it has one;
2. the token embedding (the one the model's ``get_input_embeddings`` names, else the largest embedding outside the
   blocks) is split over the vocabulary, and a linear layer outside the blocks whose outputs are that vocabulary
   (the LM head, tied or not) column-wise over it;
3. a user's plan (``{"module name pattern": "colwise" | "rowwise" | "vocab" | "replicate"}``) overrides both.

The attention modules then get their per-rank head counts (``num_heads``, ``split_size`` ...): model code that
shapes its tensors from those attributes and ``-1`` views (as Hugging Face models do) runs unmodified on its shard.
Everything else (norms, position embeddings, small heads) is replicated, and the plan says so.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.tensor.flow import BlockFlow, Inputs, block_groups, observe_block
from lightning_mp.tensor.layers import is_linear_like, lora_parts, shard_module, weight_dims
from lightning_mp.tensor.shard import Runs, ShardSpec, TPGroup, install_sequence_parallel

USER_STYLES = ("colwise", "rowwise", "vocab", "replicate")

_COLWISE = {
    "q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", "wq", "wk", "wv",
    "qkv", "qkv_proj", "c_attn", "wqkv", "query_key_value", "gate_proj", "up_proj", "gate_up_proj",
    "c_fc", "fc1", "w1", "w3", "fc_in", "wi", "wi_0", "wi_1", "dense_h_to_4h", "lin1",
}  # fmt: skip
_ROWWISE = {"o_proj", "out_proj", "c_proj", "proj", "down_proj", "fc2", "w2", "wo", "fc_out", "dense_4h_to_h", "lin2"}
_FUSED = {"qkv": 3, "qkv_proj": 3, "c_attn": 3, "wqkv": 3, "query_key_value": 3, "gate_up_proj": 2}
_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
               "n_kv_heads", "n_kv_head")  # fmt: skip
_WIDTH_ATTRS = ("split_size", "embed_dim", "all_head_size", "inner_dim")
_KV_NAMES = {"k_proj", "v_proj", "key", "value", "k", "v", "wk", "wv"}
# Hugging Face's TP styles -> the role they give a module here. Where a style gathers the output or splits the input
# itself (``colwise_gather_output``, ``rowwise_split_input``: the model slices its fused output in a way a plain split
# gets wrong) the role is kept and the layout comes from the model's data flow (``tensor.flow``); styles that keep
# the module whole (norms under HF's own sequence parallelism, gathered outputs) replicate it. Any other style (expert
# parallelism, grouped GEMMs ...) is refused, naming it, unless the user's plan places that module.
_HF_STYLES = {
    "colwise": "colwise", "local_colwise": "colwise", "packed_colwise": "colwise", "colwise_rep": "colwise",
    "colwise_gather_output": "colwise",
    "rowwise": "rowwise", "local_rowwise": "rowwise", "packed_rowwise": "rowwise", "rowwise_rep": "rowwise",
    "rowwise_split_input": "rowwise",
    "embedding": "vocab", "embedding_rowwise": "vocab", "gather": "replicate", "local": "replicate",
    "replicated_with_grad_allreduce": "replicate", "replicate": "replicate", "sequence_parallel": "replicate",
    "isolated": "replicate", "all_reduce": "replicate",
}  # fmt: skip


@dataclass
class TensorParallelPlan:
    """How each module's weights are split over ``size`` ranks (modules not listed are replicated)."""

    size: int
    container: str = ""  # the blocks' container (the pipeline's layers)
    sequence_parallel: bool = False  # activations split along the sequence between the split layers, in blocks
    styles: dict[str, str] = field(default_factory=dict)  # module name -> colwise | rowwise | vocab | head
    parts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # fused colwise module -> its parts' sizes
    runs: dict[str, Runs] = field(default_factory=dict)  # colwise module -> each rank's output runs (data flow)
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> attribute -> per-rank value
    replicated: dict[str, str] = field(default_factory=dict)  # linear-like modules in blocks left whole -> why
    source: str = "automatic"
    partial: set[str] = field(default_factory=set)  # whole parameters whose gradient each rank computes a part of
    check: str = ""  # the self-check's line in the report (see ``tensor.self_check``)
    chosen: set[str] = field(default_factory=set)  # modules the user's plan placed: the data flow leaves them be
    flow: str = ""  # the data-flow planner's line in the report (see ``tensor.flow``)

    def count(self, style: str) -> int:
        return sum(1 for s in self.styles.values() if s == style)

    def format(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in ("colwise", "rowwise", "vocab", "head") if self.count(s))
        lines = [f"  tensor parallel (tp={self.size}, {self.source} plan): {counts or 'nothing sharded'}"]
        fused = [f"{n} {list(p)}" for n, p in self.parts.items() if len(p) > 1]
        if fused:
            lines.append(
                f"    fused projections split part by part: {', '.join(fused[:3])}" + (" ..." if len(fused) > 3 else "")
            )
        for name, why in list(self.replicated.items())[:5]:
            lines.append(f"    replicated: {name} ({why})")
        if len(self.replicated) > 5:
            lines.append(f"    ... and {len(self.replicated) - 5} more replicated")
        if self.flow:
            lines.append(self.flow)
        if self.check:
            lines.append(self.check)
        return "\n".join(lines)

    def rank_parameter_bytes(self, root: nn.Module, params: list[nn.Parameter]) -> int:
        """Bytes of ``params`` one rank holds under this plan (tp rank 0, whose share is the largest)."""
        modules = dict(root.named_modules())
        split: dict[int, ShardSpec] = {}
        for name, style in self.styles.items():
            module = modules.get(name)
            if module is None or style == "replicated_kv":
                continue
            out_dim, in_dim = (0, 1) if style == "vocab" else weight_dims(module)
            dims = {"weight": in_dim} if style == "rowwise" else {"weight": out_dim, "bias": 0}
            for pname, dim in dims.items():
                p = getattr(module, pname, None)
                if isinstance(p, nn.Parameter):
                    runs = self.runs.get(name) if pname == "bias" or dim == out_dim else None
                    parts = (p.shape[dim],) if runs else self.parts.get(name) or (p.shape[dim],)
                    split[id(p)] = ShardSpec(dim, parts, 0, self.size, runs)
        total = 0
        for p in params:
            spec = split.get(id(p))
            numel = p.numel() if spec is None else p.numel() // spec.full_size * spec.local_size
            total += numel * p.element_size()
        return total

    def memory_report(self, root: nn.Module, stage_params: list[list[nn.Parameter]]) -> list[dict[str, float]]:
        """Per stage: the parameter MiB of the unsplit stage and of one of its tensor-parallel ranks."""
        report = []
        for params in stage_params:
            whole = sum(p.numel() * p.element_size() for p in params)
            report.append({"stage_mib": whole / 2**20, "rank_mib": self.rank_parameter_bytes(root, params) / 2**20})
        return report

    @staticmethod
    def format_memory(report: list[dict[str, float]]) -> str:
        stages = ", ".join(f"stage {s}: {r['rank_mib']:.3g} of {r['stage_mib']:.3g} MiB" for s, r in enumerate(report))
        return f"    parameters per rank: {stages}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "source": self.source,
            "styles": dict(self.styles),
            "parts": {k: list(v) for k, v in self.parts.items()},
            "runs": {k: [list(r) for r in v] for k, v in self.runs.items()},
            "attributes": self.attributes,
            "replicated": dict(self.replicated),
            "partial": sorted(self.partial),
        }


def plan_tensor_parallel(
    root: nn.Module,
    container_name: str,
    size: int,
    user_plan: dict[str, str] | None = None,
    sequence_parallel: bool = False,
) -> TensorParallelPlan:
    """The plan for ``root`` whose blocks are the children of ``container_name``; see the module docstring.

    Raises:
        ModelSplitError: a user plan names a style that does not fit the module, a pattern matches nothing, the
            head counts (or widths) do not divide by ``size``, or ``sequence_parallel`` with a block whose
            projections are not all split (a whole one would see only part of the sequence).
    """
    modules = dict(root.named_modules())
    plan = TensorParallelPlan(size, container_name, sequence_parallel)
    hf = _hugging_face_styles(root, modules, user_plan or {})
    prefix = container_name + "."
    for name, module in modules.items():
        if not name.startswith(prefix) or not is_linear_like(module) or _wrapped(name, modules):
            continue
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.MultiheadAttention):
            plan.replicated[name] = "inside nn.MultiheadAttention, whose forward reads the weights directly"
            continue
        style = (
            hf.get(name)
            or _style_by_name(name)
            or _style_in_sequential(name, modules)
            or _style_by_shape(name, modules)
        )
        if style in ("colwise", "rowwise"):
            plan.styles[name] = style
    if hf:
        plan.source = "Hugging Face base_model_tp_plan + automatic"
    _embedding_and_head(root, modules, container_name, plan)
    if user_plan:
        plan.chosen = _apply_user_plan(user_plan, modules, plan)
        plan.source = "user + automatic"
    for name, style in list(plan.styles.items()):
        if style == "colwise":
            parts = _fused_parts(name, modules[name], modules[name.rpartition(".")[0]], name in plan.chosen)
            if parts is None:  # a fused layout the names cannot tell: the data flow may (``tensor.flow``)
                del plan.styles[name]
                plan.replicated[name] = "a fused projection whose parts its names do not tell (no data flow seen)"
            else:
                plan.parts[name] = parts
    _pair_up(plan, prefix, keep=plan.chosen)
    plan.parts = {n: p for n, p in plan.parts.items() if plan.styles.get(n) == "colwise"}
    _whole_heads(plan, modules)
    _per_rank_attributes(plan, modules)
    for name, module in modules.items():
        if (
            name.startswith(prefix)
            and is_linear_like(module)
            and name not in plan.styles
            and not _wrapped(name, modules)
        ):
            plan.replicated.setdefault(name, "no column/row role recognised: name it in tensor_parallel_plan")
    if sequence_parallel:
        check_sequence_parallel(plan, modules, prefix)
    return plan


def check_sequence_parallel(plan: TensorParallelPlan, modules: dict[str, nn.Module], prefix: str) -> None:
    """Under sequence parallelism a block sees only its rank's part of the sequence outside the split layers: any
    layer in a block that is kept whole (attention that is not split, a replicated projection) would mix tokens it
    cannot see."""
    whole = [n for n in plan.replicated if n.startswith(prefix)]
    whole += [n for n, m in modules.items() if n.startswith(prefix) and isinstance(m, nn.MultiheadAttention)]
    if whole:
        raise ModelSplitError(
            f"sequence_parallel=True needs every projection inside the blocks split, but {whole[0]} stays whole"
            f" ({plan.replicated.get(whole[0], 'nn.MultiheadAttention')}); set sequence_parallel=False, or split it"
            " with tensor_parallel_plan."
        )


def _style_by_name(name: str) -> str | None:
    *path, leaf = name.lower().split(".")
    if leaf in _COLWISE:
        return "colwise"
    if leaf in _ROWWISE:
        return "rowwise"
    if leaf == "dense" and path:  # BERT: intermediate.dense (up), output.dense (down / attention output)
        return {"intermediate": "colwise", "output": "rowwise"}.get(path[-1])
    return None


def _style_in_sequential(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The first/last linear of an ``nn.Sequential`` MLP (Linear, parameter-free modules, Linear)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = modules.get(parent_name)
    if not isinstance(parent, nn.Sequential):
        return None
    children = list(parent.named_children())
    linear = [i for i, (_, m) in enumerate(children) if is_linear_like(m)]
    middle_free = all(not any(True for _ in m.parameters()) for _, m in children[1:-1])
    if len(linear) != 2 or linear != [0, len(children) - 1] or not middle_free:
        return None
    return "colwise" if children[0][0] == leaf else "rowwise"


def _wrapped(name: str, modules: dict[str, nn.Module]) -> bool:
    """A layer inside a LoRA wrapper: planned with the wrapper (see ``layers.lora_parts``)."""
    parts = name.split(".")
    return any(lora_parts(modules[".".join(parts[:i])]) is not None for i in range(1, len(parts)))


def _style_by_shape(name: str, modules: dict[str, nn.Module]) -> str | None:
    """An MLP recognised by its shapes, whatever its layers are called: among a module's linear children, one maps
    a hidden width ``h`` back to the model width ``d`` (row-wise) and all others map ``d`` to ``h`` (column-wise)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None:
        return None
    shapes = {n: _in_out(m) for n, m in parent.named_children() if is_linear_like(m)}
    if len(shapes) < 2 or leaf not in shapes:
        return None
    ins, outs = {i for i, _ in shapes.values()}, {o for _, o in shapes.values()}
    if len(ins) != 2 or ins != outs:
        return None
    down = [n for n, (i, o) in shapes.items() if i != o and list(shapes.values()).count((i, o)) == 1]
    ups = [n for n in shapes if n not in down]
    if len(down) != 1 or any(shapes[n] != shapes[down[0]][::-1] for n in ups):
        return None
    return "rowwise" if leaf == down[0] else "colwise"


def _in_out(module: nn.Module) -> tuple[int, int]:
    out_dim, in_dim = weight_dims(module)
    return module.weight.shape[in_dim], module.weight.shape[out_dim]


def _hugging_face_styles(root: nn.Module, modules: dict[str, nn.Module], user_plan: dict[str, str]) -> dict[str, str]:
    """module name -> style from the ``base_model_tp_plan`` of each Hugging Face base model inside ``root``.

    Raises:
        ModelSplitError: a style with no equivalent here (see ``_HF_STYLES``) on a module the user's plan does not
            place.
    """
    styles: dict[str, str] = {}
    for name, module in modules.items():
        config = getattr(module, "config", None)
        tp_plan = getattr(config, "base_model_tp_plan", None) if config is not None else None
        if not tp_plan or getattr(module, "base_model", None) is not module:
            continue
        base = name + "." if name else ""
        for pattern, hf_style in tp_plan.items():
            regex = re.compile(re.escape(base + pattern).replace(r"\*", r"\d+") + "$")
            matched = [n for n in modules if regex.match(n)]
            style = _HF_STYLES.get(hf_style)
            if style is None:
                _refuse_hf_style(base + pattern, hf_style, matched, user_plan)
                continue
            for candidate in matched:
                if style in ("colwise", "rowwise"):
                    styles[candidate] = style
    return styles


def _refuse_hf_style(pattern: str, hf_style: str, matched: list[str], user_plan: dict[str, str]) -> None:
    """A Hugging Face style with no equivalent here is refused, unless the user's plan places its modules."""
    placed = [
        n for n in matched
        if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, "*." + p) for p in user_plan)
    ]  # fmt: skip
    if len(placed) < len(matched):
        raise ModelSplitError(
            f"the model's base_model_tp_plan splits {pattern} with the Hugging Face style {hf_style!r}, which"
            f" lightning-mp does not implement (it knows {', '.join(sorted(_HF_STYLES))}): give tensor_parallel_plan"
            f" {{{pattern!r}: 'replicate'}} to keep those modules whole (or another style of"
            f" {', '.join(USER_STYLES)})."
        )


def _embedding_and_head(
    root: nn.Module, modules: dict[str, nn.Module], container: str, plan: TensorParallelPlan
) -> None:
    prefix = container + "."
    outside = {n: m for n, m in modules.items() if n and not n.startswith(prefix) and n != container}
    embedding_name = None
    for module in modules.values():
        getter = getattr(module, "get_input_embeddings", None)
        if callable(getter) and hasattr(module, "config"):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                continue
            embedding_name = next((n for n, m in outside.items() if m is found), None)
            if embedding_name:
                break
    if embedding_name is None:
        embeddings = [(m.num_embeddings, n) for n, m in outside.items() if isinstance(m, nn.Embedding)]
        embedding_name = max(embeddings)[1] if embeddings else None
    if embedding_name is None:
        return
    embedding = modules[embedding_name]
    if embedding.max_norm is not None:
        plan.replicated[embedding_name] = "max_norm renormalizes whole rows"
        return
    plan.styles[embedding_name] = "vocab"
    vocab, width = embedding.weight.shape
    for name, module in outside.items():
        if is_linear_like(module):
            out_dim, in_dim = weight_dims(module)
            if module.weight.shape[out_dim] == vocab and module.weight.shape[in_dim] == width:
                plan.styles[name] = "head"


def _apply_user_plan(user_plan: dict[str, str], modules: dict[str, nn.Module], plan: TensorParallelPlan) -> set[str]:
    """Apply the user's styles over the automatic ones; returns the modules the user placed."""
    chosen: set[str] = set()
    for pattern, style in user_plan.items():
        if style not in USER_STYLES:
            raise ModelSplitError(
                f"tensor_parallel_plan[{pattern!r}] = {style!r} is not a style: use one of {', '.join(USER_STYLES)}."
            )
        matched = [
            n for n in modules if n and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern))
        ]
        if not matched:
            raise ModelSplitError(
                f"tensor_parallel_plan pattern {pattern!r} matches no module of the model; module names look like"
                f" {', '.join(list(n for n in modules if n)[:4])} (use * for any part, e.g. 'blocks.*.mlp.0')."
            )
        for name in matched:
            module = modules[name]
            if style == "replicate":
                chosen.add(name)
                plan.styles.pop(name, None)
                plan.replicated[name] = "tensor_parallel_plan says replicate"
                continue
            wanted = nn.Embedding if style == "vocab" else None
            fits = isinstance(module, nn.Embedding) if wanted else is_linear_like(module)
            if not fits:
                kind = "an nn.Embedding" if wanted else "an nn.Linear (or Hugging Face Conv1D)"
                raise ModelSplitError(
                    f"tensor_parallel_plan asks to shard {name} ({type(module).__name__}) {style}, but only {kind}"
                    f" can be sharded {style}: change the pattern {pattern!r}, or set it to 'replicate'."
                )
            plan.styles[name] = style
            chosen.add(name)
    return chosen


def _pair_up(plan: TensorParallelPlan, prefix: str, keep: set[str]) -> None:
    """Automatic column-wise layers need a row-wise layer after them (in definition order) within their block to
    restore the full result, and a row-wise layer needs column-wise ones before it: a layer without its partner
    stays whole (the user's own choices in ``keep`` are left as given)."""
    blocks: dict[str, list[str]] = {}
    for name, style in plan.styles.items():
        if style in ("colwise", "rowwise") and name.startswith(prefix):
            blocks.setdefault(name[len(prefix) :].split(".")[0], []).append(name)
    lone: list[tuple[str, str]] = []
    for names in blocks.values():
        pending: list[str] = []
        for name in names:
            if plan.styles[name] == "colwise":
                pending.append(name)
            elif pending:
                pending = []
            else:
                lone.append((name, "no column-wise layer before it in its block to split its inputs"))
        lone += [(name, "no row-wise layer after it in its block to restore the full result") for name in pending]
    for name, why in lone:
        if name not in keep:
            del plan.styles[name]
            plan.replicated[name] = why


def _fused_parts(name: str, module: nn.Module, parent: nn.Module, chosen: bool) -> tuple[int, ...] | None:
    """The sizes of the parts of a fused projection's outputs (q, k, v; gate, up), or one part; None when the name
    says fused but the sizes do not tell the parts (the data flow decides, ``tensor.flow``).

    Raises:
        ModelSplitError: the user's plan asks for such a layer colwise.
    """
    out_dim, _ = weight_dims(module)
    width = module.weight.shape[out_dim]
    parts = _FUSED.get(name.rpartition(".")[2].lower())
    if parts is None:
        return (width,)
    heads = _first_int(parent, ("num_heads", "n_head", "n_heads", "num_attention_heads"))
    kv_heads = _first_int(parent, ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head"))
    head_dim = _first_int(parent, ("head_dim", "attention_head_size"))
    if parts == 3 and heads and kv_heads and head_dim and heads * head_dim + 2 * kv_heads * head_dim == width:
        return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if width % parts == 0:
        return (width // parts,) * parts
    if chosen:
        raise ModelSplitError(
            f"{name} looks like a fused projection of {parts} parts but has {width} outputs: give tensor_parallel_plan"
            f" {{{name!r}: 'replicate'}}, or let the automatic plan follow its data flow (drop it from the plan)."
        )
    return None


def _whole_heads(plan: TensorParallelPlan, modules: dict[str, nn.Module]) -> None:
    """Each rank must get whole attention heads. Key/value projections of a single head (multi-query attention) stay
    whole on every rank ("replicated_kv"): every rank's query heads share that head.

    Raises:
        ModelSplitError: a projection whose heads do not divide over the ranks.
    """
    size = plan.size
    for name in [n for n, s in plan.styles.items() if s == "colwise"]:
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        head_dim = _first_int(parent, ("head_dim", "attention_head_size"))
        if not head_dim:
            continue
        heads = [n // head_dim for n in plan.parts[name]]
        if all(n % head_dim == 0 and h % size == 0 for n, h in zip(plan.parts[name], heads)):
            continue
        groups = _first_int(parent, ("num_key_value_groups",))
        leaf = name.rpartition(".")[2].lower()
        if heads == [1] and leaf in _KV_NAMES and groups and groups % size == 0:  # one shared k/v head
            plan.styles[name] = "replicated_kv"
            plan.parts.pop(name)
            plan.attributes.setdefault(parent_name, {})["num_key_value_groups"] = groups // size
            continue
        raise ModelSplitError(
            f"{name} computes {'+'.join(map(str, heads))} heads of {head_dim} features, which do not split over"
            f" tensor_parallel_size={size}: use a tensor_parallel_size that divides the head counts, or give"
            f" tensor_parallel_plan {{'{parent_name}.*': 'replicate'}}."
        )


def _first_int(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for n in names:
        value = getattr(module, n, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _per_rank_attributes(plan: TensorParallelPlan, modules: dict[str, nn.Module]) -> None:
    """Per-rank head counts and widths for each module whose column-wise projections are split; checks they divide."""
    parents = {name.rpartition(".")[0] for name, style in plan.styles.items() if style == "colwise"}
    for parent_name in sorted(parents):
        parent = modules[parent_name]
        changes = plan.attributes.get(parent_name, {})
        for attr in _HEAD_ATTRS + _WIDTH_ATTRS:
            value = getattr(parent, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value % plan.size:
                what = "heads" if attr in _HEAD_ATTRS else "features"
                raise ModelSplitError(
                    f"{parent_name}.{attr} = {value} {what} cannot be split over tensor_parallel_size={plan.size}:"
                    f" use a tensor_parallel_size that divides {value}, or give tensor_parallel_plan"
                    f" {{'{parent_name}.*': 'replicate'}} to keep this module whole."
                )
            changes.setdefault(attr, value // plan.size)
        if changes:
            plan.attributes[parent_name] = changes


def set_attributes(module: nn.Module, changes: dict[str, int]) -> None:
    """Set ``module``'s per-rank sizes. A dotted name (``config.n_head``) is read from an object the module holds,
    often shared by every layer of the model: the module gets its own copy of that object, so that the other
    modules (and the whole model outside this rank's split layers) keep reading the whole sizes."""
    copies: dict[str, Any] = {}
    for path, value in changes.items():
        holder_name, _, attr = path.rpartition(".")
        if not holder_name:
            setattr(module, attr, value)
            continue
        if holder_name not in copies:
            *outer, last = holder_name.split(".")
            owner = module
            for part in outer:
                owner = getattr(owner, part)
            copies[holder_name] = copy.copy(getattr(owner, last))
            setattr(owner, last, copies[holder_name])
        setattr(copies[holder_name], attr, value)


@dataclass
class TensorParallelState:
    """What applying a plan made of this rank's stage."""

    specs: dict[str, ShardSpec]  # parameter name -> the part of the full tensor this rank holds
    partial_grads: list[str]  # whole parameters whose gradient is a per-rank part, summed over the group
    has_head: bool  # an LM head split over the vocabulary is on this stage
    tp: TPGroup


def apply_tensor_parallel(root: nn.Module, plan: TensorParallelPlan, tp: TPGroup) -> TensorParallelState:
    """Shard the planned modules present in ``root`` (this rank's stage) and set their per-rank attributes.

    A tied parameter (embedding and LM head on one stage) is split once. Under sequence parallelism the blocks'
    whole parameters (norms, row-parallel biases) see part of the sequence: their gradients are summed over the
    group (``partial_grads``).
    """
    modules = dict(root.named_modules())
    by_param: dict[int, ShardSpec] = {}
    for name, style in plan.styles.items():
        module = modules.get(name)
        if module is None or not (is_linear_like(module) or isinstance(module, nn.Embedding)):
            continue  # on another stage (a placeholder here)
        try:
            specs = shard_module(module, style, tp, plan.parts.get(name), by_param, plan.runs.get(name))
        except ValueError as err:
            raise ModelSplitError(f"{name}: {err}") from err
        for param_name, spec in specs.items():
            by_param[id(module.get_parameter(param_name))] = spec
    for name, module in modules.items():  # a module that reads a split weight must be split itself
        split = [pn for pn, p in module.named_parameters(recurse=False) if id(p) in by_param]
        if split and not hasattr(module, "_lmp_tp"):
            raise ModelSplitError(
                f"{name} ({type(module).__name__}) shares its parameter '{split[0]}' with a layer the tensor-parallel"
                " plan splits, but is not split itself: split both (e.g. an LM head tied to the embedding: 'vocab' for"
                " the embedding, automatic for the head) or replicate both in tensor_parallel_plan."
            )
    for name, changes in plan.attributes.items():
        if name in modules:
            set_attributes(modules[name], changes)
    named = list(root.named_parameters(remove_duplicate=False))
    partial = {id(p) for name, style in plan.styles.items() if style == "replicated_kv" and name in modules
               for p in modules[name].parameters()}  # fmt: skip
    partial |= {id(p) for n, p in named if n in plan.partial}  # found by the self-check
    if plan.sequence_parallel:
        blocks = [b for b in modules[plan.container].children() if any(hasattr(m, "_lmp_tp") for m in b.modules())]
        parents = {n.rpartition(".")[0] for n, s in plan.styles.items() if s in ("colwise", "replicated_kv")}
        install_sequence_parallel(blocks, [modules[n] for n in sorted(parents) if n in modules], tp)
        partial |= {id(p) for b in blocks for p in b.parameters() if id(p) not in by_param}
    return TensorParallelState(
        specs={n: by_param[id(p)] for n, p in named if id(p) in by_param},
        partial_grads=[n for n, p in named if id(p) in partial],
        has_head=any(s == "head" and n in modules for n, s in plan.styles.items()),
        tp=tp,
    )


def use_block_flow(plan: TensorParallelPlan, modules: dict[str, nn.Module], blocks: list[str], flow: BlockFlow) -> None:
    """Replace what the names planned inside ``blocks`` (alike, by class and shapes) with what one block's data flow
    showed (``tensor.flow``): styles, each rank's runs of the column-parallel outputs, and the per-rank sizes. Where
    the flow could not tell the sizes, the names' attribute rules are used."""
    for block in blocks:
        prefix = block + "."
        named_parts = {n: p for n, p in plan.parts.items() if n.startswith(prefix)}
        for table in (plan.styles, plan.parts, plan.runs, plan.replicated):
            for name in [n for n in table if n.startswith(prefix)]:
                del table[name]
        for name in [n for n in plan.attributes if n == block or n.startswith(prefix)]:
            del plan.attributes[name]
        for rel, style in flow.styles.items():
            name = prefix + rel
            plan.styles[name] = style
            if style == "colwise":
                _set_layout(plan, name, flow.runs[rel], named_parts.get(name))
        plan.replicated.update({prefix + rel: f"data flow: {why}" for rel, why in flow.whole.items()})
        for rel, changes in flow.attributes.items():
            plan.attributes[f"{prefix}{rel}".rstrip(".")] = dict(changes)
        _kv_groups(plan, modules, prefix)
    if flow.sizes_problem:
        _per_rank_attributes(plan, modules)


def _set_layout(plan: TensorParallelPlan, name: str, runs: Runs, named: tuple[int, ...] | None) -> None:
    """Store a column-parallel layer's layout as parts when even slices of them give each rank its runs, else as
    explicit runs."""
    width = sum(length for rank in runs for _, length in rank)
    for parts in [p for p in (named, (width,)) if p and sum(p) == width]:
        even = [tuple((o, n) for o, n in ShardSpec(0, parts, r, plan.size).slices() if n) for r in range(plan.size)]
        if even == [tuple(r) for r in runs]:
            plan.parts[name] = parts
            return
    plan.parts[name], plan.runs[name] = (width,), runs


def _kv_groups(plan: TensorParallelPlan, modules: dict[str, nn.Module], prefix: str) -> None:
    """Key/value projections kept whole on every rank beside split query heads: their module's query heads per
    key/value head (``num_key_value_groups``) shrink with the query heads."""
    for name in [n for n, s in plan.styles.items() if s == "replicated_kv" and n.startswith(prefix)]:
        parent_name = name.rpartition(".")[0]
        groups = _first_int(modules[parent_name], ("num_key_value_groups",))
        if groups and groups % plan.size == 0:
            plan.attributes.setdefault(parent_name, {})["num_key_value_groups"] = groups // plan.size


def follow_data_flow(
    root: nn.Module, plan: Any, capture: Callable[[list[str]], dict[str, Inputs]],
    prepare: Callable[[Inputs], Inputs], device: torch.device,
) -> str:  # fmt: skip
    """Re-plan each group of alike blocks of ``plan`` (a ``TensorParallelPlan``) from one block's observed data flow,
    on the inputs ``capture`` records (``prepare`` makes them fp32 on ``device``); returns the plan report's line.

    Raises:
        ModelSplitError: a size the split divides does not divide by the tensor-parallel size.
    """
    modules = dict(root.named_modules())
    groups = block_groups(root, plan.container, plan.chosen)
    if not groups:
        return ""
    captured = capture([g[0] for g in groups])
    by_names: list[str] = []
    for blocks in groups:
        first = blocks[0]
        if first not in captured:
            by_names.append(f"{first} (not called on the observed batch)")
            continue
        try:
            block = copy.deepcopy(modules[first]).float().to(device)
            flow = observe_block(block, prepare(captured[first]), plan.size, first)
        except ModelSplitError:
            raise
        except Exception as err:  # the names' plan stands; the self-check judges it
            by_names.append(f"{first} ({type(err).__name__}: {err})")
            continue
        use_block_flow(plan, modules, blocks, flow)
        if flow.sizes_problem:
            by_names.append(f"{first}'s sizes ({flow.sizes_problem})")
    planned = len(groups) - len(by_names)
    text = f"    data flow: {planned} of {len(groups)} distinct blocks planned from one observed forward"
    return text + (f"; by names: {', '.join(by_names)}" if by_names else "")

"""The stage plan: which layers and modules each pipeline stage runs. Pure data, the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_mp.plan.discovery import ModelLayers
from lightning_mp.runtime.tree import Path

if TYPE_CHECKING:
    from lightning_mp.plan.cost_model import PlanPrediction

PLACEHOLDER = "lightning_mp_placeholder"


def is_placeholder(name: str) -> bool:
    """Whether a parameter name is the empty parameter that a stage without trainable parameters carries."""
    return name.rsplit(".", 1)[-1] == PLACEHOLDER


@dataclass(frozen=True)
class Carry:
    """A tensor that crosses a stage boundary beside the activation (see ``plan.flow``): where the sending stage
    finds it (a layer's input; None: it received it and passes it on) and where the receiving stage uses it."""

    key: int
    source: tuple[int, Path] | None
    consumers: tuple[tuple[int, Path], ...]


@dataclass
class StagePlan:
    """Which layers and modules each stage runs. Pure data: the same on every rank."""

    layers: ModelLayers
    balance: list[int]
    balance_method: str = "uniform"
    param_counts: list[int] | None = None  # parameters each stage holds (tied weights on each stage using them)
    prediction: PlanPrediction | None = None  # from measured layer costs, when they were measured
    stage_ranks: list[int] | None = None  # with virtual stages: each stage's pipeline rank (else stage s: rank s)

    @property
    def num_stages(self) -> int:
        return len(self.balance)

    def layer_range(self, stage: int) -> range:
        start = sum(self.balance[:stage])
        return range(start, start + self.balance[stage])

    def stage_of_layer(self, index: int) -> int:
        return next(s for s in range(self.num_stages) if index in self.layer_range(s))

    def stage_at(self, position: int) -> int:
        """The stage that runs what the model does after ``position`` layers: the first stage before the layers, the
        last after them, and between two layers the stage of the layer after (it receives the one before's output
        and runs what comes between)."""
        if position <= 0:
            return 0
        if position >= self.layers.num_layers:
            return self.num_stages - 1
        return self.stage_of_layer(position)

    def carries_into(self, stage: int) -> list[Carry]:
        """The tensors that must travel into ``stage`` beside the activation: computed from parameters or layers
        before the stage's first layer, not part of the previous layer's output, and read by a layer of this stage
        or a later one (then passed on)."""
        inputs = self.layers.inputs
        if not inputs or stage == 0:
            return []
        start = self.layer_range(stage).start
        first_seen: dict[int, tuple[int, Path]] = {}
        for j, layer_inputs in enumerate(inputs):
            for item in layer_inputs:
                first_seen.setdefault(item.key, (j, item.path))
        later = [item for j in range(start, len(inputs)) for item in inputs[j]]
        needed = sorted({i.key for i in later if i.derived and not i.main and first_seen[i.key][0] < start})
        previous_start = self.layer_range(stage - 1).start
        carries = []
        for key in needed:
            source = first_seen[key] if first_seen[key][0] >= previous_start else None
            consumers = tuple(
                (j, i.path) for j in self.layer_range(stage) for i in inputs[j] if i.key == key and not i.main
            )
            carries.append(Carry(key, source, consumers))
        return carries

    def outside_modules(self, stage: int) -> list[str]:
        """The modules outside the layers that ``stage`` runs."""
        return [n for n, ps in self.layers.positions.items() if any(self.stage_at(p) == stage for p in ps)]

    def describe(self) -> list[dict[str, Any]]:
        """One dict per stage: its layers, the modules before/after them it runs, and its parameter count."""
        rows = []
        for s in range(self.num_stages):
            rng = self.layer_range(s)
            names = self.layers.layer_names
            rows.append(
                {
                    "stage": s,
                    "layers": f"{names[rng.start]}..{names[rng.stop - 1]}" if len(rng) > 1 else names[rng.start],
                    "num_layers": len(rng),
                    "before": self.layers.pre if s == 0 else [],
                    "after": self.layers.post if s == self.num_stages - 1 else [],
                    "between": [n for n in self.outside_modules(s) if n in self.layers.between],
                }
            )
        return rows

    def to_dict(self, ranks: list[list[int]] | None = None) -> dict[str, Any]:
        """The plan as JSON-ready data; ``ranks[s]`` are the global ranks that run stage ``s``."""
        stages = self.describe()
        for row in stages:
            s = row["stage"]
            row["layer_names"] = [self.layers.layer_names[i] for i in self.layer_range(s)]
            if ranks is not None:
                row["ranks"] = ranks[s]
            if self.param_counts:
                row["params"] = self.param_counts[s]
            if self.prediction is not None:
                row["predicted_time_s"] = self.prediction.stage_time[s]
                row["predicted_memory_bytes"] = self.prediction.stage_memory[s]
        out: dict[str, Any] = {
            "container": self.layers.display_name,
            "num_layers": self.layers.num_layers,
            "balance": self.balance,
            "balance_method": self.balance_method,
            "stages": stages,
        }
        if self.prediction is not None:
            out.update(
                predicted_step_time_s=self.prediction.step_time,
                predicted_bubble=self.prediction.bubble,
                imbalance=self.prediction.imbalance,
            )
        return out

    def format(self) -> str:
        """A human-readable table of the plan."""
        lines = [
            f"lightning-mp stage plan: {self.layers.num_layers} layers of '{self.layers.display_name}'"
            f" in {self.num_stages} stages, balance={self.balance} ({self.balance_method})"
        ]
        for row in self.describe():
            extra = []
            if row["before"]:
                extra.append("before: " + ", ".join(row["before"]))
            if row["after"]:
                extra.append("after: " + ", ".join(row["after"]))
            if row["between"]:
                extra.append("between layers: " + ", ".join(row["between"]))
            counts, pred = self.param_counts, self.prediction
            params = f", {counts[row['stage']]:,} params" if counts else ""
            if pred is not None:
                params += (
                    f", {1e3 * pred.stage_time[row['stage']]:.1f} ms/micro-batch,"
                    f" {pred.stage_memory[row['stage']] / 2**20:.1f} MiB"
                )
            where = f" (on pipeline rank {self.stage_ranks[row['stage']]})" if self.stage_ranks else ""
            lines.append(
                f"  stage {row['stage']}{where}: {row['layers']} ({_count(row['num_layers'], 'layer')}{params})"
                + (f"; {'; '.join(extra)}" if extra else "")
            )
        if self.prediction is not None:
            pred = self.prediction
            lines.append(
                f"  predicted: {pred.step_time:.3f} s/step, bubble {100 * pred.bubble:.1f}%,"
                f" imbalance {pred.imbalance:.2f} (slowest / mean stage)"
            )
        return "\n".join(lines)


def _modules_of_stage(root: nn.Module, plan: StagePlan, stage: int) -> list[nn.Module]:
    layers = plan.layers
    mods = [layers.layer(i) for i in plan.layer_range(stage)]
    mods += [root.get_submodule(n) if n else root for n in plan.outside_modules(stage)]
    return mods


def stage_parameters(root: nn.Module, plan: StagePlan, stage: int) -> list[nn.Parameter]:
    params: dict[int, nn.Parameter] = {}
    for i, module in enumerate(_modules_of_stage(root, plan, stage)):
        recurse = i < len(plan.layer_range(stage))  # layers own everything inside; outside modules their own params
        for p in module.parameters(recurse=recurse):
            params[id(p)] = p
    return list(params.values())


def shared_parameters(root: nn.Module, plan: StagePlan) -> list[tuple[str, tuple[int, ...]]]:
    """Parameters used by more than one stage (tied weights), with the stages that use them, in name order."""
    stages_of: dict[int, set[int]] = {}
    for s in range(plan.num_stages):
        for p in stage_parameters(root, plan, s):
            stages_of.setdefault(id(p), set()).add(s)
    shared = []
    for name, p in root.named_parameters():
        if len(stages_of.get(id(p), ())) > 1:
            shared.append((name, tuple(sorted(stages_of[id(p)]))))
    return shared


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")

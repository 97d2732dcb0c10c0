"""The stage plan: which layers and modules each pipeline stage runs. Pure data, the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_mp.plan.discovery import ModelLayers

if TYPE_CHECKING:
    from lightning_mp.plan.cost_model import PlanPrediction

PLACEHOLDER = "lightning_mp_placeholder"


def is_placeholder(name: str) -> bool:
    """Whether a parameter name is the empty parameter that a stage without trainable parameters carries."""
    return name.rsplit(".", 1)[-1] == PLACEHOLDER


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
            "container": self.layers.container_name,
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
            f"lightning-mp stage plan: {self.layers.num_layers} layers of '{self.layers.container_name}'"
            f" in {self.num_stages} stages, balance={self.balance} ({self.balance_method})"
        ]
        for row in self.describe():
            extra = []
            if row["before"]:
                extra.append("before: " + ", ".join(row["before"]))
            if row["after"]:
                extra.append("after: " + ", ".join(row["after"]))
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
    names = (layers.pre if stage == 0 else []) + (layers.post if stage == plan.num_stages - 1 else [])
    mods += [root.get_submodule(n) if n else root for n in names]
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

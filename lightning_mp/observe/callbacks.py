"""``PipelineSummary``: what the pipeline did, printed at the end of ``fit`` (steps/s, each stage's busy time)."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class PipelineSummary(L.Callback):
    """Prints, on global rank 0 after training, the steps/s and each stage's busy and waiting time per step.

    "busy" is forward and backward compute; "wait" is time blocked on receives from the neighbouring stages. On
    GPUs whose utilization NVML reports, a "GPU-Util" column adds each rank's mean ``nvidia-smi`` GPU-Util (percent,
    read once per step; ``gpu_util`` in each row, None for a rank that could not read it); on a CPU there is no such
    column or key. The first ``skip`` steps are left out of the averages (warm-up); stage times cover the last 1000
    steps. The summary is also kept as ``self.summary``.
    """

    def __init__(self, skip: int = 1) -> None:
        self.skip = skip
        self.step_times: list[float] = []
        self.summary: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.step_times.append(time.perf_counter() - self._t0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        stats = getattr(strategy, "stats", [])[self.skip :]
        mine = {
            "rank": trainer.global_rank,
            "stage": getattr(strategy, "stage", 0),
            "busy_s": sum(s.busy for s in stats) / max(len(stats), 1),
            "wait_s": sum(s.wait for s in stats) / max(len(stats), 1),
            "wall_s": sum(s.wall for s in stats) / max(len(stats), 1),
            "gpu_util": _mean([s.utilization for s in stats if s.utilization is not None]),
        }
        rows = [mine]
        if dist.is_available() and dist.is_initialized():
            fields = list(mine)
            local = torch.tensor([float(mine[f]) for f in fields], dtype=torch.float64, device=strategy.root_device)
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            rows = [dict(zip(fields, t.tolist())) for t in gathered]
            for row in rows:
                row["rank"], row["stage"] = int(row["rank"]), int(row["stage"])
        has_util = any(not math.isnan(r["gpu_util"]) for r in rows)  # a GPU with NVML; never on a CPU
        for row in rows:
            util = row.pop("gpu_util")
            if has_util:
                row["gpu_util"] = None if math.isnan(util) else util
        times = self.step_times[self.skip :] or self.step_times
        step_s = sum(times) / max(len(times), 1)
        shares = [r["busy_s"] / r["wall_s"] for r in rows if r["wall_s"]]
        self.summary = {
            "steps": len(self.step_times),
            "steps_per_s": 1.0 / step_s if step_s else 0.0,
            "step_s": step_s,
            "bubble": 1.0 - sum(shares) / len(shares) if shares else None,  # idle share of the stages' step time
            "ranks": rows,
        }
        plan = getattr(strategy, "plan", None)
        lines = [
            f"lightning-mp summary: {len(self.step_times)} steps, {self.summary['steps_per_s']:.2f} steps/s"
            f" ({step_s:.3f} s/step over the last {len(times)})",
            f"  {'rank':>4} {'stage':>5} {'busy s/step':>12} {'wait s/step':>12} {'busy %':>7}"
            + (f" {'GPU-Util':>9}" if has_util else ""),
        ]
        for r in sorted(rows, key=lambda r: (r["stage"], r["rank"])):
            share = 100 * r["busy_s"] / r["wall_s"] if r["wall_s"] else 0.0
            line = f"  {r['rank']:>4} {r['stage']:>5} {r['busy_s']:>12.3f} {r['wait_s']:>12.3f} {share:>6.1f}%"
            if has_util:
                line += f" {r['gpu_util']:>8.1f}%" if r["gpu_util"] is not None else f" {'n/a':>9}"
            lines.append(line)
        if plan is not None:  # the whole plan was printed at start-up: only a reminder here
            lines.append(f"  balance={plan.balance} ({plan.balance_method}), as in the stage plan printed at start-up")
        rank_zero_info("\n".join(lines))


def _mean(values: list[float]) -> float:
    """The mean of ``values``; NaN for none."""
    return sum(values) / len(values) if values else math.nan

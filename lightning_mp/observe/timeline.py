"""Seeing the pipeline: each stage's forwards, backwards, receives and sends of a step, on one time axis.

Every training step, each stage records its spans (``StepStats.spans``, seconds since an origin the ranks set
together after a barrier); they reach every rank with the step's statistics. :class:`PipelineTimeline` writes the
last steps as a Chrome trace (open ``timeline.json`` in https://ui.perfetto.dev or chrome://tracing) and as
``timeline.png``, one lane per stage:

    stage 0 |F0|F1|F2|F3|B0|F4|B1| ...      F = forward, B = backward (of micro-batch i), W = deferred weight
    stage 1 |  |F0|B0|F1|B1|F2|B2| ...      gradients; grey = blocked on a receive; white = idle (the bubble)

The gaps are the bubble: at the start stage 1 waits for stage 0's first forward, at the end stage 0 waits for
stage 1's last backward. ``bubble_report`` sets the measured bubble beside the schedule's ideal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_mp.observe.monitor import measured_bubble
from lightning_mp.observe.stats import StepStats

COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#DD8452", "recv": "#C8C8C8", "send": "#E5E5E5"}
LEGEND = {"F": "forward", "B": "backward", "W": "weight gradients (zero_bubble)", "recv": "waiting on a receive"}


def ideal_bubble(schedule: str, num_stages: int, microbatches: int, chunks: int = 1) -> float:
    """The idle share of a step with equal stages and free messages: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/p
    without micro-batches, (p-1)/(3m+p-1) for zero_bubble (ZB-H1 with forward, input- and weight-gradient
    passes of equal cost: the last two thirds of each backward fill the bubble), and (p-1)/(v·m+p-1) for
    interleaved 1F1B with v chunks per rank. For zero_bubble_v and interleaved zero_bubble (v > 1), their own orders
    played out with those costs."""
    p = num_stages
    if schedule == "zero_bubble_v" or (schedule == "zero_bubble" and chunks > 1):
        from lightning_mp.plan.schedule_choice import simulate_step
        from lightning_mp.plan.schedules import build_schedule

        v = 2 if schedule == "zero_bubble_v" else chunks
        orders = [build_schedule(schedule, r, p, microbatches, v) for r in range(p)]
        step = simulate_step(orders, [1.0] * v * p, deferred_share=0.5)
        return 1.0 - v * microbatches / step
    if schedule == "interleaved_1f1b":
        return (p - 1) / (chunks * microbatches + p - 1)
    if schedule == "zero_bubble":
        return (p - 1) / (3 * microbatches + p - 1)
    m = 1 if schedule == "none" else microbatches
    return (p - 1) / (m + p - 1)


def bubble_report(steps: list[list[StepStats]], schedule: str, microbatches: int, chunks: int = 1) -> dict[str, float]:
    """The measured bubble (mean over ``steps``, each a list of every stage's statistics) and the ideal one."""
    measured = [measured_bubble(stages) for stages in steps]
    p = len(steps[0]) if steps else 1
    return {
        "bubble": sum(measured) / max(len(measured), 1),
        "bubble_ideal": ideal_bubble(schedule, p, microbatches, chunks),
        "peak_activation_bytes": [max(s[i].peak_activation_bytes for s in steps) for i in range(p)] if steps else [],
    }


def chrome_trace(steps: list[list[StepStats]]) -> dict[str, Any]:
    """The spans of ``steps`` as a Chrome trace: one thread per stage, times in microseconds."""
    events: list[dict[str, Any]] = []
    num_stages = len(steps[0]) if steps else 0
    for stage in range(num_stages):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": stage, "args": {"name": f"stage {stage}"}})
    for step, stages in enumerate(steps):
        for stage, stats in enumerate(stages):
            for kind, microbatch, start, end in stats.spans:
                events.append(
                    {
                        "name": kind if microbatch < 0 else f"{kind}{microbatch}",
                        "cat": kind,
                        "ph": "X",
                        "ts": start * 1e6,
                        "dur": (end - start) * 1e6,
                        "pid": 0,
                        "tid": stage,
                        "args": {"step": step, "micro-batch": microbatch},
                    }
                )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def plot_timeline(steps: list[list[StepStats]], path: Path, title: str = "") -> Path | None:
    """A PNG of the spans, one lane per stage (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.patches
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    num_stages = len(steps[0]) if steps else 0
    origin = min((sp[2] for stages in steps for s in stages for sp in s.spans), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 0.6 * num_stages + 1.6))
    for stages in steps:
        for stage, stats in enumerate(stages):
            for kind, microbatch, start, end in _merged(stats.spans):
                x, width = (start - origin) * 1e3, (end - start) * 1e3
                ax.broken_barh([(x, width)], (stage - 0.4, 0.8), facecolors=COLORS.get(kind, "#999999"))
                if kind in ("F", "B", "W") and width > 0:
                    ax.text(x + width / 2, stage, f"{kind}{microbatch}", ha="center", va="center", fontsize=6)
    kinds = {sp[0] for stages in steps for s in stages for sp in s.spans}
    handles = [matplotlib.patches.Patch(color=COLORS[k], label=label) for k, label in LEGEND.items() if k in kinds]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.38), ncol=len(handles), fontsize=8)
    ax.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title or "pipeline timeline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _merged(spans: list[tuple[str, int, float, float]], gap: float = 2e-4) -> list[tuple[str, int, float, float]]:
    """Consecutive spans of one kind and micro-batch as one (a micro-batch's weight gradients run layer by layer)."""
    out: list[tuple[str, int, float, float]] = []
    for span in sorted(spans, key=lambda sp: sp[2]):
        if out and out[-1][:2] == span[:2] and span[2] - out[-1][3] <= gap:
            out[-1] = (*span[:2], out[-1][2], span[3])
        else:
            out.append(span)
    return out


class PipelineTimeline(L.Callback):
    """At the end of training, global rank 0 writes the last ``steps`` steps as ``timeline.json`` (Chrome trace)
    and ``timeline.png`` in ``dirpath`` (default: the trainer's ``default_root_dir``), and logs how the measured
    bubble compares with the schedule's ideal.

    Needs ``ModelParallel(pipeline_metrics=True)`` (the default), which shares every stage's spans each step.
    """

    def __init__(self, dirpath: str | Path | None = None, steps: int = 3) -> None:
        self.dirpath = dirpath
        self.steps = steps
        self.report: dict[str, Any] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        runner = getattr(trainer.strategy, "runner", None)
        if runner is None or trainer.global_rank != 0 or not runner.timelines:
            return
        steps = list(runner.timelines)[-self.steps :]
        out = Path(self.dirpath or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "timeline.json").write_text(json.dumps(chrome_trace(steps)))
        schedule, m = runner.schedule, runner.microbatches
        self.report = bubble_report(steps, schedule, m, runner.chunks)
        title = f"{schedule}, {len(steps[0])} stages, {m} micro-batches: bubble {100 * self.report['bubble']:.0f}%"
        png = plot_timeline(steps, out / "timeline.png", title + f" (ideal {100 * self.report['bubble_ideal']:.0f}%)")
        rank_zero_info(
            f"lightning-mp timeline of the last {len(steps)} steps: {out / 'timeline.json'} (Perfetto,"
            f" chrome://tracing) {_png_note(png)}; measured bubble {100 * self.report['bubble']:.1f}%, ideal for"
            f" {schedule} {100 * self.report['bubble_ideal']:.1f}%"
        )


def _png_note(png: Path | None) -> str:
    """What became of the picture: written, or why not."""
    return f"and {png.name}" if png is not None else "(no timeline.png: matplotlib is not installed)"

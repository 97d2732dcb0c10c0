"""Tuning model parallelism with a Hydra multirun: one table and one plot of the whole sweep.

Each job of the sweep leaves a ``summary.json`` in its output directory (the recipes write one: the job's
overrides, steps/s, the measured bubble and the final metrics). :class:`SweepSummary`, a Hydra callback, reads them
when the sweep ends and writes next to the jobs:

- ``sweep_summary.json`` and ``sweep_summary.md``: one row per job, the swept settings first;
- ``sweep_summary.png``: steps/s and the bubble against each swept setting (one line per combination of the
  others).

Enable it in the app's config::

    hydra:
      callbacks:
        sweep_summary:
          _target_: lightning_mp.integrations.sweep.SweepSummary
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

try:
    from hydra.experimental.callback import Callback
except ImportError:  # Hydra is optional for the strategy itself
    Callback = object  # type: ignore[assignment,misc]

SUMMARY_FILE = "summary.json"


class SweepSummary(Callback):
    """Writes the sweep's table and plot at the end of a multirun (see the module docstring)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = collect(sweep_dir)
        if rows:
            write_summary(rows, sweep_dir)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job under ``sweep_dir`` that left a summary: ``settings`` (its overrides), ``steps_per_s``,
    ``bubble`` and ``metrics``."""
    rows = []
    for path in sorted(sweep_dir.glob(f"*/{SUMMARY_FILE}"), key=lambda p: _job_number(p.parent.name)):
        job = json.loads(path.read_text())
        settings = dict(o.lstrip("+~").partition("=")[::2] for o in job.get("overrides", []))
        metrics = {k: v for k, v in job.get("metrics", {}).items() if not k.startswith("pipeline/")}
        rows.append(
            {
                "job": path.parent.name,
                "settings": settings,
                "steps_per_s": job.get("steps_per_s"),
                "bubble": job.get("bubble"),
                "metrics": metrics,
            }
        )
    return rows


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The settings whose value differs between jobs, in the order they first appear."""
    keys: list[str] = []
    for row in rows:
        for key in row["settings"]:
            if key not in keys and len({r["settings"].get(key) for r in rows}) > 1:
                keys.append(key)
    return keys


def write_summary(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write the JSON table, the Markdown table and (with matplotlib) the PNG plot; return their paths."""
    keys = swept_keys(rows)
    metric_names = sorted({k for r in rows for k in r["metrics"]})
    columns = ["job", *keys, "steps/s", "bubble", *metric_names]
    written = [out_dir / "sweep_summary.json", out_dir / "sweep_summary.md"]
    written[0].write_text(json.dumps({"swept": keys, "rows": rows}, indent=2))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["job"], *(row["settings"].get(k) for k in keys), row["steps_per_s"], row["bubble"]]
        cells += [row["metrics"].get(k) for k in metric_names]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    written[1].write_text("\n".join(lines) + "\n")
    print(f"sweep summary ({len(rows)} jobs, written to {out_dir}):\n" + "\n".join(lines))
    plot = _plot(rows, keys, out_dir / "sweep_summary.png")
    if plot is not None:
        written.append(plot)
    return written


def _plot(rows: list[dict[str, Any]], keys: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        logging.getLogger("matplotlib.category").setLevel(logging.WARNING)  # settings plot as categories
    except ImportError:
        return None
    rows = [{**r["settings"], **r} for r in rows]  # settings as top-level keys for the plot
    if not keys:
        keys = ["job"]
    fig, axes = plt.subplots(2, len(keys), figsize=(4.5 * len(keys), 6), squeeze=False)
    for col, key in enumerate(keys):
        others = [k for k in keys if k != key]
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(", ".join(f"{k}={row[k]}" for k in others), []).append(row)
        for label, group in groups.items():
            xs = [str(r[key]) for r in group]
            axes[0][col].plot(xs, [r["steps_per_s"] or 0 for r in group], marker="o", label=label or None)
            axes[1][col].plot(xs, [100 * (r["bubble"] or 0) for r in group], marker="o", label=label or None)
        axes[0][col].set_title(key)
        axes[0][col].set_ylabel("steps/s")
        axes[1][col].set_ylabel("bubble %")
        axes[1][col].set_xlabel(key)
        if others:
            axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _job_number(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)

"""Rewrites the README's benchmark tables from benchmarks/results-*.jsonl (the JSON lines the benchmarks print).

Usage: ``python benchmarks/pipeline.py > benchmarks/results-pipeline.jsonl``, likewise for balance.py,
schedules.py, tensor.py, memory.py and overhead.py, then
``python benchmarks/render_tables.py``. Each table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pipeline_table(rows: list[dict]) -> str:
    lines = [
        "| model | configuration | s/step | fair one process, same rounds | speedup vs fair | vs whole batch |"
        " schedule's ideal | of ideal (fair) | of ideal, both cores busy | vs torch.distributed.pipelining |"
        " stage busy / wait s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = r.get("model", "gpt")
        if "slowdown" in r:
            lines.append(f"| {model} | {r['config']} | {r['step_s']:.3f} | | {1 / r['slowdown']:.3f}× | | | | | | |")
            continue
        if "speedup" not in r:
            lines.append(f"| {model} | {r['config']} | {r['step_s']:.3f} | | | | | | | | |")
            continue
        vs = f"**{r['vs_torch']:.3f}×**" if "vs_torch" in r else ""
        if r.get("vs_torch_rounds"):
            rounds = r["vs_torch_rounds"]
            ahead = sum(x >= 1 for x in rounds)
            vs += f" (rounds {min(rounds):.2f}–{max(rounds):.2f}, {ahead} of {len(rounds)} ≥ 1)"
        loaded = f"{100 * r['of_ideal_loaded']:.1f}%" if "of_ideal_loaded" in r else ""
        whole = f"{r['speedup_whole']:.2f}×" if "speedup_whole" in r else ""
        stages = " · ".join(f"{b:.2f} / {w:.2f}" for b, w in zip(r.get("stage_busy_s", []), r.get("stage_wait_s", [])))
        lines.append(
            f"| {model} | {r['config']} | {r['step_s']:.3f} | {r['fair_s']:.3f} | {r['speedup']:.2f}× |"
            f" {whole} | {r['ideal']:.2f}× | {100 * r['of_ideal']:.1f}% | {loaded} | {vs} |"
            f" {stages} |"
        )
    return "\n".join(lines)


def balance_table(rows: list[dict]) -> str:
    lines = ["| configuration | balance | s/step | stage busy s/step |", "|---|---|---|---|"]
    summary = {}
    for r in rows:
        if r.get("summary"):
            summary = r
            continue
        busy = " · ".join(f"{b:.2f}" for b in r["stage_busy_s"])
        lines.append(f"| {r['config']} | {r['balance']} | {r['step_s']:.3f} | {busy} |")
    lines += [
        "",
        f'`balance="time"` chose {summary["time_balance"]}: {summary["time_step_s"]:.3f} s/step against'
        f" {summary['best_step_s']:.3f} for the best split found by trying all of them ({summary['best_split']}),"
        f" i.e. {100 * summary['time_vs_best']:.1f}% of the best speed (target ≥ 95%), and"
        f" {summary['time_vs_uniform']:.2f}× the speed of the uniform split."
        + (
            " It is the same split as the best one: the gap between the two rows is run-to-run noise."
            if summary["time_balance"] == summary["best_split"]
            else ""
        ),
    ]
    return "\n".join(lines)


def schedules_table(rows: list[dict]) -> str:
    lines = [
        "| configuration | m | steps/s | speedup vs whole batch (ideal) | vs fair one process | bubble (ideal) |"
        " peak activation MiB, stage 0 · 1 | activation vs GPipe (ideal) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["config"] == "one process":
            lines.append(f"| one process (whole batch) | | {1 / r['step_s']:.3f} | 1.00× | | | | |")
            continue
        if r["config"].startswith("one process"):
            lines.append(f"| {r['config']} | {r['microbatches']} | {1 / r['step_s']:.3f} | | 1.00× | | | |")
            continue
        vs = ""
        if "activation_vs_gpipe" in r:
            ratios = " · ".join(f"{a:.2f}" for a in r["activation_vs_gpipe"])
            vs = f"{ratios} ({' · '.join(f'{a:.2f}' for a in r['activation_vs_gpipe_ideal'])})"
        memory = " · ".join(f"{mb:.1f}" for mb in r["peak_activation_mb"])
        bubble = f"{100 * r['bubble']:.1f}% ({100 * r['bubble_ideal']:.1f}%)"
        fair = f"{r['speedup_fair']:.2f}×" if "speedup_fair" in r else ""
        lines.append(
            f"| {r['config']} | {r['microbatches']} | {r['steps_per_s']:.3f} | {r['speedup']:.2f}×"
            f" ({r['speedup_ideal']:.2f}×) | {fair} | {bubble} | {memory} | {vs} |"
        )
    return "\n".join(lines)


def tensor_table(rows: list[dict]) -> str:
    lines = [
        "| case | d_model | one process s | tp=2 s | speedup (ideal 2×) | of ideal | DTensor styles tp=2 s |"
        " lightning-mp vs DTensor | parameters per rank vs one process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = "one block" if r["case"] == "block" else f"GPT, {r['layers']} blocks + tied head"
        dtensor = f"{r['dtensor_tp2_s']:.3f}" if "dtensor_tp2_s" in r else ""
        versus = f"{r['ours_vs_dtensor']:.2f}×" if "ours_vs_dtensor" in r else ""
        memory = f"{r['param_mib_per_rank']:.1f} / {r['param_mib_one_process']:.1f} MiB = {r['param_fraction']:.3f}"
        lines.append(
            f"| {case} | {r['d_model']} | {r['one_process_s']:.3f} | {r['tp2_s']:.3f} | {r['speedup']:.2f}× |"
            f" {100 * r['of_ideal']:.1f}% | {dtensor} | {versus} | {memory} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    lines = [
        "| model | dp × pp | level | parameters MiB (× none) | gradients MiB (× none) | optimizer MiB (× none; ideal) |"
        " rank total MiB | peak in a step MiB | M parameters per GiB: between steps · peak | steps/s (× none) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = f"{r['params_total'] / 1e6:.1f} M, {r['source']}"
        parts = [f"{mib(r[p])} ({r[f'{p}_vs_none']:.3f})" for p in ("parameters", "gradients")]
        optimizer = f"{mib(r['optimizer'])} ({r['optimizer_vs_none']:.3f}; {r['optimizer_ideal']:.3f})"
        peak = mib(r["step_peak"]) if "step_peak" in r else ""
        per_gib = f"{r['params_per_gib'] / 1e6:.1f}"
        if "params_per_gib_step" in r:
            per_gib += f" · {r['params_per_gib_step'] / 1e6:.1f}"
        speed = f"{r['steps_per_s']:.3f} ({r['speed_vs_none']:.2f})" if "steps_per_s" in r else ""
        lines.append(
            f"| {model} | {r['dp']} × {r['pp']} | `{r['level']}` | {parts[0]} | {parts[1]} | {optimizer} |"
            f" {mib(r['total'])} | {peak} | {per_gib} | {speed} |"
        )
    goal = [r for r in rows if r["level"] == "optimizer" and r["source"] == "measured"]
    full = [r for r in rows if r["level"] == "full" and r["source"] == "measured"]
    if goal and full:
        off = max(abs(r["optimizer_vs_ideal"] - 1) for r in goal)
        best = max(full, key=lambda r: r["params_per_gib"])
        none = next(r for r in rows if r["level"] == "none" and r["source"] == "measured" and r["dp"] == best["dp"])
        at = f"dp {best['dp']} × pp {best['pp']}"
        lines += [
            "",
            f"Measured optimizer state at `optimizer`: within {100 * off:.2f}% of the ideal 1/dp of `none`'s at every"
            f" layout (goal: 5%). At `full`, one GiB of rank memory holds the parameters, gradients and AdamW state of"
            f" {best['params_per_gib'] / 1e6:.0f} M parameters between steps at {at} (`none`:"
            f" {none['params_per_gib'] / 1e6:.0f} M), and {best['params_per_gib_step'] / 1e6:.0f} M at the peak of a"
            " step.",
        ]
    return "\n".join(lines)


def overhead_table(rows: list[dict]) -> str:
    lines = ["| measurement | baseline | lightning-mp | lightning-mp's speed vs the baseline |", "|---|---|---|---|"]
    for r in rows:
        if r["config"] == "pp1":
            lines.append(
                f"| pp = 1, tp = 1, GPT {r['layers']} × d {r['d']}, batch {r['batch']} | plain Lightning, one device:"
                f" {r['lightning_step_s']:.3f} s/step | {r['lightning_mp_step_s']:.3f} s/step | {r['ratio']:.3f}× |"
            )
        elif r["config"] == "metrics":
            lines.append(
                f"| pp = 2, per-step metrics and timeline on | both off: {r['off_step_s']:.3f} s/step |"
                f" {r['on_step_s']:.3f} s/step | {r['ratio']:.3f}× |"
            )
        elif r["config"] == "per_microbatch":
            lines.append(
                f"| per micro-batch: {r['microbatches']} one-sample micro-batches of a {r['layers']}-block d"
                f" {r['d']} GPT, pp = 1 | plain PyTorch loop: {r['torch_step_s'] * 1e3:.1f} ms/step (Lightning"
                f" accumulating: {r['lightning_accumulate_step_s'] * 1e3:.1f} ms) |"
                f" {r['lightning_mp_step_s'] * 1e3:.1f} ms/step | +{r['overhead_us_per_microbatch']:.0f} µs per"
                " micro-batch |"
            )
        elif r["config"] == "per_microbatch_pp2":
            lines.append(
                f"| per micro-batch at pp = 2 ({r['schedule']}, the same {r['microbatches']} micro-batches, head"
                f" untied) | torch.distributed.pipelining: {r['torch_step_s'] * 1e3:.1f} ms/step |"
                f" {r['lightning_mp_step_s'] * 1e3:.1f} ms/step | {r['vs_torch']:.2f}×,"
                f" +{r['overhead_us_per_microbatch']:.0f} µs per micro-batch |"
            )
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    tables = (
        ("pipeline-table", pipeline_table),
        ("balance-table", balance_table),
        ("schedules-table", schedules_table),
        ("tensor-table", tensor_table),
        ("memory-table", memory_table),
        ("overhead-table", overhead_table),
    )
    for name, render in tables:
        results = ROOT / "benchmarks" / f"results-{name.split('-')[0]}.jsonl"
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        block = f"<!-- {name} -->\n{render(rows)}\n<!-- /{name} -->"
        text, count = re.subn(rf"<!-- {name} -->.*?<!-- /{name} -->", lambda _, block=block: block, text, flags=re.S)
        if count != 1:
            raise SystemExit(f"README.md needs exactly one <!-- {name} --> ... <!-- /{name} --> block")
    readme.write_text(text)


if __name__ == "__main__":
    main()

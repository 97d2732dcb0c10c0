"""GPU check: lightning-mp at pp = 2 on two GPUs over NCCL, against one GPU, in a few minutes.

The cases (the same that ``pytest -m cuda`` runs, tests/test_cuda.py): a wide MLP (4 blocks of 4,096 × 4,096,
tests/models.py ``WideNet``) whose every message between the stages holds 16 MiB (1,024 samples × 4,096 fp32 values
per micro-batch, 4 micro-batches, SGD, no dropout), 4 steps:

- fp32 under ``1f1b``, ``zero_bubble`` and ``interleaved_1f1b``: losses and parameters within 1e-5 of one GPU;
- ``bf16-mixed`` and ``16-mixed`` under ``1f1b``: finite losses and parameters, losses within 5% of one GPU at the
  same precision.

Each case runs through the tests' harness (tests/harness.py; one process per GPU, Lightning's launcher) in a process
of its own, bounded in time, so a hang ends that case (and a stage's ``timeout`` of 60 s ends its ranks). One JSON
line per case: schedule, precision, the largest difference from one GPU (losses and parameters), step time, each
stage's busy and waiting seconds per step and NVML GPU utilization (``pipeline/stage<i>_gpu_util``, percent; None
without NVML: ``pip install nvidia-ml-py``), and the timeline PNG the ``PipelineTimeline`` callback wrote (None
without matplotlib). A last line says whether every case passed; the exit status is 1 if one did not.

Without CUDA it prints ``skipped: no CUDA`` (with one GPU: ``skipped: needs 2 CUDA devices``) and exits with 0.

Usage, from the repository root: ``python benchmarks/gpu_check.py [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

WIDTH = 4096  # features: each message holds MICROBATCH × WIDTH values
MICROBATCH = 1024
MICROBATCHES = 4
STEPS = 4
MESSAGE_BYTES = MICROBATCH * WIDTH * 4  # fp32: 16 MiB
FP32_SCHEDULES = ("1f1b", "zero_bubble", "interleaved_1f1b")
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")
EXACT_ATOL = 1e-5  # fp32, against one GPU
MIXED_LOSS_RTOL = 0.05  # mixed precision, against one GPU at the same precision
BUDGET_S = 330.0  # the whole check; each case in its own process, stopped when the budget runs out
CASE_TIMEOUT_S = 120.0
STAGE_TIMEOUT_S = 60  # ModelParallel(timeout=...): a hung message ends the ranks with a message naming it


def cases() -> list[tuple[str, str]]:
    """(schedule, precision) of every pipelined case."""
    return [(s, "32-true") for s in FP32_SCHEDULES] + [("1f1b", p) for p in MIXED_PRECISIONS]


def reference_name(precision: str) -> str:
    return f"one-gpu-{precision}"


def case_name(schedule: str, precision: str) -> str:
    return f"pp2-{schedule}-{precision}"


def _job(name: str, precision: str, accelerator: str, width: int, microbatch: int) -> dict[str, Any]:
    batch = microbatch * MICROBATCHES
    return {
        "name": name,
        "model": "wide",
        "model_kwargs": {"width": width, "batch_size": batch, "n": batch * STEPS},
        "accelerator": accelerator,
        "max_steps": STEPS,
        "trainer": {"precision": precision},
        "summary": True,
    }


def reference_jobs(accelerator: str = "gpu", width: int = WIDTH, microbatch: int = MICROBATCH) -> list[dict]:
    """One GPU, no strategy, the whole batch at once: at each precision the cases use."""
    precisions = dict.fromkeys(p for _, p in cases())
    return [_job(reference_name(p), p, accelerator, width, microbatch) for p in precisions]


def case_job(
    schedule: str, precision: str, accelerator: str = "gpu", width: int = WIDTH, microbatch: int = MICROBATCH
) -> dict[str, Any]:
    """Two GPUs, two stages, ``schedule``, ``MICROBATCHES`` micro-batches, the timeline written by rank 0."""
    job = _job(case_name(schedule, precision), precision, accelerator, width, microbatch)
    strategy = {"pipeline_parallel_size": 2, "schedule": schedule, "microbatches": MICROBATCHES}
    return {**job, "devices": 2, "strategy": {**strategy, "timeout": STAGE_TIMEOUT_S}, "timeline": True}


def jobs(**kw: Any) -> list[dict[str, Any]]:
    """Every job of the check, references first (tests/harness.py runs them in order)."""
    return reference_jobs(**kw) + [case_job(s, p, **kw) for s, p in cases()]


def differences(ref: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, float]:
    """The largest absolute difference of the losses (every rank's, every step) and of the parameters (every
    parameter some rank holds, by name) from the reference's; inf for a missing step or name."""
    from lightning_mp.plan.stage_plan import is_placeholder

    loss = param = 0.0
    for got in ranks:
        if len(got["losses"]) != len(ref["losses"]):
            loss = math.inf
        for a, b in zip(ref["losses"], got["losses"]):
            loss = max(loss, abs(a - b))
        for name, value in got["params"].items():
            if is_placeholder(name):
                continue  # the empty parameter of a stage with nothing to train
            if name not in ref["params"]:
                param = math.inf
                continue
            param = max(param, (value.float() - ref["params"][name].float()).abs().max().item())
    return {"loss": loss, "param": param}


def finite(result: dict[str, Any]) -> bool:
    """Every loss and parameter value is finite."""
    import torch

    losses = all(math.isfinite(x) for x in result["losses"])
    return losses and all(bool(torch.isfinite(p).all()) for p in result["params"].values())


def logged_utilization(result: dict[str, Any]) -> dict[int, float]:
    """Mean ``pipeline/stage<i>_gpu_util`` over the steps after the first, by stage (empty where none was logged)."""
    values: dict[int, list[float]] = {}
    for step in result["metrics"][1:] or result["metrics"]:
        for key, value in step.items():
            if key.startswith("pipeline/stage") and key.endswith("_gpu_util"):
                values.setdefault(int(key[len("pipeline/stage") : -len("_gpu_util")]), []).append(value)
    return {stage: round(sum(v) / len(v), 1) for stage, v in sorted(values.items())}


def report(
    schedule: str, precision: str, ref: dict[str, Any], ranks: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    """The JSON line of one case, ``ok`` saying whether it passed."""
    diff = differences(ref, ranks)
    summary = ranks[0]["summary"] or {}
    stages = [
        {
            "stage": row["stage"],
            "rank": row["rank"],
            "busy_s": round(row["busy_s"], 4),
            "wait_s": round(row["wait_s"], 4),
            "gpu_util": None if row.get("gpu_util") is None else round(row["gpu_util"], 1),
        }
        for row in sorted(summary.get("ranks", []), key=lambda r: r["stage"])
    ]
    line: dict[str, Any] = {
        "case": case_name(schedule, precision),
        "schedule": schedule,
        "precision": precision,
        "max_abs_diff": max(diff.values()),
        "loss_max_abs_diff": diff["loss"],
        "param_max_abs_diff": diff["param"],
        "finite": all(finite(r) for r in ranks),
        "step_s": round(summary.get("step_s", math.nan), 4),
        "one_gpu_step_s": round((ref["summary"] or {}).get("step_s", math.nan), 4),
        "message_mib": MESSAGE_BYTES / 2**20 if precision == "32-true" else MESSAGE_BYTES / 2**21,
        "stages": stages,
        "gpu_util_logged": logged_utilization(ranks[0]),
    }
    png = out / case_name(schedule, precision) / "timeline.png"
    line["timeline_png"] = str(png) if png.exists() else None
    if precision == "32-true":
        line["ok"] = line["finite"] and line["max_abs_diff"] <= EXACT_ATOL
    else:
        worst = max((abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref["losses"], ranks[0]["losses"])), default=0)
        line["loss_max_rel_diff"] = worst
        line["ok"] = line["finite"] and worst <= MIXED_LOSS_RTOL and len(ranks[0]["losses"]) == STEPS
    return line


def run_jobs(job_list: list[dict[str, Any]], out: Path, timeout: float) -> tuple[bool, str]:
    """Run ``job_list`` through tests/harness.py in a session of its own; (finished in time with status 0, the tail
    of its output). On timeout the whole session (every rank) is killed."""
    from tests.conftest import JOB_ENV_LEFT_OUT

    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"jobs-{job_list[-1]['name']}.json"
    spec.write_text(json.dumps(job_list))
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV_LEFT_OUT}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    log = out / f"{job_list[-1]['name']}.log"
    with log.open("w") as sink:
        argv = [sys.executable, str(ROOT / "tests" / "harness.py"), str(spec), str(out)]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False, f"timed out after {timeout:.0f} s (a hang?); log: {log}\n" + log.read_text()[-2000:]
    return code == 0, log.read_text()[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", help="where the results, logs and timelines go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < 2:
        why = "no CUDA" if found == 0 else f"needs 2 CUDA devices, found {found}"
        print(json.dumps({"skipped": why}))
        print(f"skipped: {why}", file=sys.stderr)
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.conftest import load_result

    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    start = time.monotonic()
    devices = [torch.cuda.get_device_name(i) for i in range(2)]
    print(json.dumps({"devices": devices, "torch": torch.__version__, "out_dir": str(out)}), flush=True)
    finished, tail = run_jobs(reference_jobs(), out, min(CASE_TIMEOUT_S, BUDGET_S))
    if not finished:
        print(json.dumps({"case": "one GPU references", "ok": False, "error": tail[-1500:]}), flush=True)
        print("FAILED: the one-GPU references did not run", file=sys.stderr)
        return 1
    refs = {p: load_result(out, reference_name(p), 0) for _, p in cases()}
    passed = []
    for schedule, precision in cases():
        left = BUDGET_S - (time.monotonic() - start)
        name = case_name(schedule, precision)
        if left < 20:
            line: dict[str, Any] = {"case": name, "ok": False, "error": f"not run: {BUDGET_S:.0f} s budget spent"}
        else:
            finished, tail = run_jobs([case_job(schedule, precision)], out, min(CASE_TIMEOUT_S, left))
            if finished:
                ranks = [load_result(out, name, r) for r in range(2)]
                line = report(schedule, precision, refs[precision], ranks, out)
            else:
                line = {"case": name, "schedule": schedule, "precision": precision, "ok": False, "error": tail[-1500:]}
        passed.append(line["ok"])
        print(json.dumps(line), flush=True)
    ok = all(passed)
    elapsed = time.monotonic() - start
    print(json.dumps({"passed": sum(passed), "cases": len(passed), "ok": ok, "seconds": round(elapsed, 1)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

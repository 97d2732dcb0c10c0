"""What the benchmarks share: timing a Lightning fit, and running a worker process that reports one JSON result."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent


class StepTimer(L.Callback):
    """Wall time of every training step (batch start to batch end, optimizer step included); with ``accumulate``
    batches per optimizer step, from the first batch's start to the last batch's end."""

    def __init__(self, accumulate: int = 1) -> None:
        self.times: list[float] = []
        self.accumulate = accumulate

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.accumulate == 0:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.accumulate == 0:
            self.times.append(time.perf_counter() - self._t0)


def fit_and_time(
    model: L.LightningModule,
    loader: DataLoader,
    steps: int,
    strategy: Any,
    devices: int,
    report: Callable[[L.Trainer], dict] | None = None,
    accumulate: int = 1,
    callbacks: list[L.Callback] | None = None,
) -> dict | None:
    """Train ``steps`` + 1 steps; on global rank 0 return the median step time after the first, and per-stage
    busy/wait seconds when the strategy pipelines (None on other ranks); ``report(trainer)`` adds its own keys.
    With ``accumulate``, a step is that many batches (one optimizer step)."""
    from lightning_mp.observe.callbacks import PipelineSummary

    timer, summary = StepTimer(accumulate), PipelineSummary()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, summary, *(callbacks or [])],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(model, loader)
    if trainer.global_rank != 0:
        return None
    stages = (
        {
            r["stage"]: {"busy_s": round(r["busy_s"], 3), "wait_s": round(r["wait_s"], 3)}
            for r in summary.summary.get("ranks", [])
        }
        if devices > 1
        else None
    )
    plan = getattr(trainer.strategy, "plan", None)
    return {
        "step_s": statistics.median(timer.times[1:]),
        "stages": stages,
        "balance": plan.balance if plan is not None else None,
        **(report(trainer) if report is not None else {}),
    }


def gpt_arguments(description: str, seq: int = 128, batch: int = 32, steps: int = 5) -> argparse.ArgumentParser:
    """The benchmark GPT's shape options (``--layers --d --heads --seq --batch --steps``) on a new parser."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps, help="timed steps, after one warm-up step")
    return p


def run_worker(script: str, args: list[str], ranks: int = 1) -> dict:
    """Run ``python script --out FILE ARGS`` (``ranks`` copies with torch.distributed variables when > 1, for
    workers that start their own process group) and return the JSON the worker wrote to FILE."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, script, "--out", str(out), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("LOCAL_RANK", None)
        if ranks > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), WORLD_SIZE=str(ranks))
            procs = [
                subprocess.Popen(
                    argv,
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for r in range(ranks)
            ]
            errors = [p.communicate()[1] for p in procs]
            codes = [p.returncode for p in procs]
        else:
            proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            codes, errors = [proc.returncode], [proc.stderr]
        if any(codes):
            raise RuntimeError(f"{' '.join(args)} failed:\n" + "\n".join(e[-3000:] for e in errors))
        return json.loads(out.read_text())


def write_result(path: str, result: dict | None) -> None:
    """Worker side of :func:`run_worker` (rank 0 writes)."""
    if result is not None:
        Path(path).write_text(json.dumps(result))


def run_if_worker(args: argparse.Namespace, worker: Callable[[argparse.Namespace], None]) -> bool:
    """In a worker process (``--worker`` given): run ``worker`` on one thread and return True."""
    if not getattr(args, "worker", None):
        return False
    import torch

    torch.set_num_threads(1)
    worker(args)
    return True

"""What the benchmarks share: timing a Lightning fit, and running a worker process that reports one JSON result."""

from __future__ import annotations

import argparse
import json
import os
import socket
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

from benchmarks.lockstep import Turn

ROOT = Path(__file__).resolve().parent.parent
# a benchmark configuration -> (lightning-mp schedule, stages per rank); "zero_bubble_interleaved" is zero_bubble with
# two stages per rank (interleaved zero bubble)
CONFIGURATIONS: dict[str, tuple[str, int]] = {
    "gpipe": ("gpipe", 1),
    "1f1b": ("1f1b", 1),
    "interleaved_1f1b": ("interleaved_1f1b", 2),
    "zero_bubble": ("zero_bubble", 1),
    "zero_bubble_interleaved": ("zero_bubble", 2),
    "zero_bubble_v": ("zero_bubble_v", 2),
    "none": ("none", 1),
}


class StepTimer(L.Callback):
    """Wall time of every training step (batch start to batch end, optimizer step included); with ``accumulate``
    batches per optimizer step, from the first batch's start to the last batch's end. In a lock-step run (see
    ``benchmarks/lockstep.py``) each step also waits for its turn."""

    def __init__(self, accumulate: int = 1) -> None:
        self.times: list[float] = []
        self.accumulate = accumulate
        self._turn: Turn | None = None

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self._turn = Turn.from_env(trainer.global_rank)

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.accumulate == 0:
            if self._turn is not None:
                self._turn.begin()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.accumulate == 0:
            self.times.append(time.perf_counter() - self._t0)
            if self._turn is not None:
                self._turn.end()
                if trainer.global_step >= trainer.max_steps:
                    self._turn.begin()  # the release: exit only once every worker has run its steps


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


def pipeline_strategy(configuration: str, pp: int, microbatches: int, **options: Any) -> Any:
    """lightning-mp's strategy for a benchmark configuration (a key of :data:`CONFIGURATIONS`), layers split evenly."""
    import lightning_mp

    schedule, per_rank = CONFIGURATIONS[configuration]
    return lightning_mp.ModelParallel(
        pipeline_parallel_size=pp,
        schedule=schedule,
        virtual_stages=per_rank,
        microbatches=microbatches,
        balance="uniform",
        **options,
    )


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
        env = worker_env()
        if ranks > 1:
            procs = [
                subprocess.Popen(
                    argv,
                    env={**env, **rank_env},
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for rank_env in process_group_envs(ranks)
            ]
            errors = [p.communicate()[1] for p in procs]
            codes = [p.returncode for p in procs]
        else:
            proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            codes, errors = [proc.returncode], [proc.stderr]
        if any(codes):
            raise RuntimeError(f"{' '.join(args)} failed:\n" + "\n".join(e[-3000:] for e in errors))
        return json.loads(out.read_text())


def worker_env() -> dict[str, str]:
    """A worker's environment: one thread, no warnings, no rank or rendezvous variables of its parent."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def process_group_envs(ranks: int) -> list[dict[str, str]]:
    """The torch.distributed variables of each of ``ranks`` processes that start a process group on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks)}
    return [{**common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(ranks)]


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

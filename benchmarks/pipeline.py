"""Pipeline speed: lightning-mp at pp=2 against one process and against hand-written torch.distributed.pipelining.

Every configuration trains the same GPT (examples/gpt.py, untied head so that torch.distributed.pipelining can run it
too) on the same total batch with AdamW, one thread per process, gloo on CPU. Prints one JSON line per configuration:

- ``speedup``: steps/s over one process running the whole model on the whole batch (measured in this invocation);
- ``ideal``: p·m/(m+p−1), the speedup of a perfectly balanced pipeline with free communication;
- ``of_ideal``: speedup / ideal;
- ``vs_torch``: steps/s over the torch.distributed.pipelining run with the same schedule (lightning-mp rows).

Each configuration runs ``--repeats`` times, lightning-mp and torch alternating, and the fastest run counts (the
median step of a run, after one warm-up step): step times on this kind of machine drift by up to ±15% between runs.

Usage: ``python benchmarks/pipeline.py [--layers 8 --d 512 --seq 128 --batch 32 --microbatches 8 --steps 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, alternating; the fastest counts")
    p.add_argument("--worker", choices=["single", "lmp", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model(a: argparse.Namespace) -> Any:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=a.layers, n_embd=a.d, n_head=a.heads, block_size=a.seq, tie_weights=False))


def _data(a: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, ((a.steps + 1) * a.batch, a.seq + 1), generator=g)


# ---- workers ----------------------------------------------------------------------------------------------------


def _lightning_worker(a: argparse.Namespace) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_mp

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)

    from lightning_mp.callbacks import PipelineSummary

    timer = StepTimer()
    summary = PipelineSummary()
    if a.worker == "single":
        strategy: Any = "auto"
        devices = 1
    else:
        strategy = lightning_mp.ModelParallel(
            pipeline_parallel_size=2, schedule=a.schedule, microbatches=a.microbatches
        )
        devices = 2
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=a.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, summary],
    )
    trainer.fit(_model(a), DataLoader(_data(a), batch_size=a.batch))
    if trainer.global_rank == 0:
        stages = (
            {
                r["stage"]: {"busy_s": round(r["busy_s"], 3), "wait_s": round(r["wait_s"], 3)}
                for r in summary.summary.get("ranks", [])
            }
            if a.worker == "lmp"
            else None
        )
        Path(a.out).write_text(json.dumps({"step_s": statistics.median(timer.times[1:]), "stages": stages}))


def _torch_worker(a: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = _model(a)
    half = a.layers // 2

    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe, self.blocks = model.wte, model.wpe, model.blocks[:half]

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return x

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks, self.ln_f, self.head = model.blocks[half:], model.ln_f, model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln_f(x))

    module = First() if rank == 0 else Last()
    # Shapes are inferred at the first step (this model tolerates the uninitialized inputs that inference uses).
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    cls = ScheduleGPipe if a.schedule == "gpipe" else Schedule1F1B
    schedule = cls(stage, n_microbatches=a.microbatches, loss_fn=loss_fn)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-4, weight_decay=0.01)
    data = _data(a)
    times = []
    for step in range(a.steps + 1):
        batch = data[step * a.batch : (step + 1) * a.batch]
        t0 = time.perf_counter()
        opt.zero_grad()
        if rank == 0:
            schedule.step(batch[:, :-1])
        else:
            schedule.step(target=batch[:, 1:])
        opt.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    if rank == 0:
        Path(a.out).write_text(json.dumps({"step_s": statistics.median(times[1:])}))
    dist.destroy_process_group()


# ---- orchestration ----------------------------------------------------------------------------------------------


def _run(a: argparse.Namespace, worker: str, schedule: str = "1f1b") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [
            sys.executable,
            __file__,
            "--worker",
            worker,
            "--schedule",
            schedule,
            "--out",
            str(out),
            "--layers",
            str(a.layers),
            "--d",
            str(a.d),
            "--heads",
            str(a.heads),
            "--seq",
            str(a.seq),
            "--batch",
            str(a.batch),
            "--microbatches",
            str(a.microbatches),
            "--steps",
            str(a.steps),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("LOCAL_RANK", None)
        if worker == "torch":
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), WORLD_SIZE="2")
            procs = [
                subprocess.Popen(
                    argv,
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for r in range(2)
            ]
            errors = [p.communicate()[1] for p in procs]
            codes = [p.returncode for p in procs]
        else:
            proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            codes, errors = [proc.returncode], [proc.stderr]
        if any(codes):
            raise RuntimeError(f"{worker} {schedule} failed:\n" + "\n".join(e[-3000:] for e in errors))
        return json.loads(out.read_text())


def main() -> None:
    a = _args()
    if a.worker:
        torch.set_num_threads(1)
        (_torch_worker if a.worker == "torch" else _lightning_worker)(a)
        return
    p, m = 2, a.microbatches
    ideal = p * m / (m + p - 1)
    model = {"layers": a.layers, "d": a.d, "seq": a.seq, "batch": a.batch, "microbatches": m, "threads_per_rank": 1}
    single = min(_run(a, "single")["step_s"] for _ in range(a.repeats))
    print(json.dumps({"config": "one process", **model, "step_s": round(single, 3)}), flush=True)
    for schedule in a.schedules.split(","):
        torch_runs, lmp_runs = [], []
        for _ in range(a.repeats):  # alternate, so that drifting machine speed hits both alike
            torch_runs.append(_run(a, "torch", schedule))
            lmp_runs.append(_run(a, "lmp", schedule))
        torch_s = min(r["step_s"] for r in torch_runs)
        lmp = min(lmp_runs, key=lambda r: r["step_s"])
        for name, t in (
            (f"torch.distributed.pipelining {schedule}", torch_s),
            (f"lightning-mp {schedule}", lmp["step_s"]),
        ):
            row = {
                "config": name,
                "pp": p,
                **model,
                "step_s": round(t, 3),
                "speedup": round(single / t, 3),
                "ideal": round(ideal, 3),
                "of_ideal": round(single / t / ideal, 3),
            }
            if name.startswith("lightning-mp"):
                row["vs_torch"] = round(torch_s / t, 3)
                row["stage_busy_s"] = [lmp["stages"][k]["busy_s"] for k in sorted(lmp["stages"], key=int)]
                row["stage_wait_s"] = [lmp["stages"][k]["wait_s"] for k in sorted(lmp["stages"], key=int)]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

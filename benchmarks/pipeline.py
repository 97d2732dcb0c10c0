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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import fit_and_time, gpt_arguments, run_worker, write_result  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = gpt_arguments(__doc__)
    p.add_argument("--microbatches", type=int, default=8)
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
    from torch.utils.data import DataLoader

    import lightning_mp

    if a.worker == "single":
        strategy, devices = "auto", 1
    else:
        strategy = lightning_mp.ModelParallel(
            pipeline_parallel_size=2, schedule=a.schedule, microbatches=a.microbatches
        )
        devices = 2
    write_result(a.out, fit_and_time(_model(a), DataLoader(_data(a), batch_size=a.batch), a.steps, strategy, devices))


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
        write_result(a.out, {"step_s": statistics.median(times[1:])})
    dist.destroy_process_group()


# ---- orchestration ----------------------------------------------------------------------------------------------


def _run(a: argparse.Namespace, worker: str, schedule: str = "1f1b") -> dict[str, Any]:
    args = ["--worker", worker, "--schedule", schedule]
    for name in ("layers", "d", "heads", "seq", "batch", "microbatches", "steps"):
        args += [f"--{name}", str(getattr(a, name))]
    return run_worker(__file__, args, ranks=2 if worker == "torch" else 1)


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

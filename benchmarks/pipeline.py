"""Pipeline speed: lightning-mp at pp=2 against two one-process baselines and torch.distributed.pipelining.

Every configuration trains the same model on the same total batch with AdamW, one thread per process, gloo on CPU:
``--model gpt`` (examples/gpt.py: LayerNorm, GELU MLP) or ``--model llama`` (the same with RMSNorm and a SwiGLU MLP of
``--hidden`` 1376), untied head so that torch.distributed.pipelining can run it too. Prints one JSON line per
configuration:

- ``speedup_whole``: steps/s over one process running the whole batch at once;
- ``speedup``: steps/s over one process running the *same micro-batches*, accumulated (the fair baseline: same
  kernels, same shapes; on this machine the whole batch at once runs slower per sample than micro-batches do),
  ``fair_s`` its step time;
- ``ideal``: the schedule's own, p·(1 − its ideal bubble): p·m/(m+p−1) for GPipe and 1F1B, p·v·m/(v·m+p−1) for
  interleaved 1F1B with v stages per rank, p·3m/(3m+p−1) for zero_bubble (forward, input- and weight-gradient
  passes of equal cost), and for the zero-bubble schedules with two stages per rank their orders played out;
- ``of_ideal``: speedup (fair) / ideal;
- ``of_ideal_loaded``: the same against the fair baseline run while a second copy runs beside it (``slowdown``: how
  much slower one core computes when both are busy, from shared caches and memory bandwidth; a pipeline of two keeps
  both busy, so ``ideal`` cannot be reached on a machine where ``slowdown`` > 1);
- ``vs_torch``: steps/s over torch.distributed.pipelining running the same split, micro-batches and schedule
  (``zero_bubble``: ZB-H1, one stage per rank, against torch's interleaved zero-bubble class with one stage per rank,
  its ZB-H1; ``zero_bubble_interleaved``: lightning-mp's zero_bubble with virtual_stages=2 against the same class with
  two stages per rank); ``vs_torch_rounds``: the ratio in each round.

Step times on this kind of machine drift by ±10–15% within minutes, so for each schedule the fair baseline, torch
and lightning-mp run **in lock step** (``benchmarks/lockstep.py``): all three are started together and take turns
one training step at a time, the first mover rotating, so that their n-th steps run within seconds of each other.
Each one's step time is the median of its ``--steps`` timed steps (after one warm-up step). The whole-batch baseline
and the loaded pair run on their own, ``--repeats`` times alternating, the fastest counting.

Usage: ``python benchmarks/pipeline.py [--model llama --layers 8 --d 512 --seq 128 --batch 32 --microbatches 8]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CONFIGURATIONS,
    fit_and_time,
    gpt_arguments,
    pipeline_strategy,
    process_group_envs,
    run_worker,
    worker_env,
    write_result,
)
from benchmarks.lockstep import Side, Turn, run_in_lock_step  # noqa: E402

SCHEDULES = "gpipe,1f1b,interleaved_1f1b,zero_bubble,zero_bubble_interleaved,zero_bubble_v"
# configuration (CONFIGURATIONS) -> (torch.distributed.pipelining class, placement of its stages); torch's interleaved
# zero-bubble class with one stage per rank is its ZB-H1 ("ZB1P"), with two its interleaved zero bubble
TORCH_SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "zero_bubble_interleaved": ("ScheduleInterleavedZeroBubble", "loop"),
    "zero_bubble_v": ("ScheduleZBVZeroBubble", "v"),
}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = gpt_arguments(__doc__, steps=8)
    p.add_argument("--model", choices=["gpt", "llama"], default="gpt")
    p.add_argument("--hidden", type=int, default=1376, help="the SwiGLU MLP's width (--model llama)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--schedules", default=SCHEDULES)
    p.add_argument(
        "--repeats", type=int, default=2, help="runs of the lone baselines, the fastest counting (0: lock step only)"
    )
    p.add_argument("--worker", choices=["single", "accum", "lmp", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model(a: argparse.Namespace) -> Any:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    swiglu = {"mlp": "swiglu", "hidden": a.hidden} if a.model == "llama" else {}
    return GPT(GPTConfig(n_layer=a.layers, n_embd=a.d, n_head=a.heads, block_size=a.seq, tie_weights=False, **swiglu))


def _data(a: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, ((a.steps + 1) * a.batch, a.seq + 1), generator=g)


# ---- workers ----------------------------------------------------------------------------------------------------


def _lightning_worker(a: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    data = _data(a)
    if a.worker == "single":  # the whole batch at once
        result = fit_and_time(_model(a), DataLoader(data, batch_size=a.batch), a.steps, "auto", 1)
    elif a.worker == "accum":  # the same micro-batches, accumulated: one optimizer step per batch
        loader = DataLoader(data, batch_size=a.batch // a.microbatches)
        result = fit_and_time(_model(a), loader, a.steps, "auto", 1, accumulate=a.microbatches)
    else:
        strategy = pipeline_strategy(a.schedule, 2, a.microbatches)
        result = fit_and_time(_model(a), DataLoader(data, batch_size=a.batch), a.steps, strategy, 2)
    write_result(a.out, result)


def _torch_stages(model: Any, rank: int, ranks: int, per_rank: int, placement: str) -> list[tuple[int, Any]]:
    """This rank's (stage index, module) pairs: the layers in ``ranks · per_rank`` equal runs, the embeddings on the
    first, the final norm and head on the last; stage k on rank k mod ranks ("loop") or down and back up ("v")."""
    from torch import nn

    total = ranks * per_rank
    per = len(model.blocks) // total

    class Part(nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.first, self.last = k == 0, k == total - 1
            self.blocks = model.blocks[k * per : (k + 1) * per]
            if self.first:
                self.wte, self.wpe = model.wte, model.wpe
            if self.last:
                self.ln_f, self.head = model.ln_f, model.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.first:
                x = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln_f(x)) if self.last else x

    mine = [rank, total - 1 - rank] if placement == "v" else [rank + i * ranks for i in range(per_rank)]
    return [(k, Part(k)) for k in mine]


def _torch_worker(a: argparse.Namespace) -> None:
    import torch.distributed as dist
    import torch.distributed.pipelining as pipelining
    from torch import nn
    from torch.distributed.pipelining import PipelineStage

    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    per_rank = CONFIGURATIONS[a.schedule][1]
    name, placement = TORCH_SCHEDULES[a.schedule]
    parts = _torch_stages(_model(a), rank, ranks, per_rank, placement)
    stages = [PipelineStage(m, k, ranks * per_rank, torch.device("cpu")) for k, m in parts]

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    cls = getattr(pipelining, name)
    multi = issubclass(cls, pipelining.schedules.PipelineScheduleMulti)  # takes a list, even of one stage
    schedule = cls(stages if multi else stages[0], n_microbatches=a.microbatches, loss_fn=loss_fn)
    params = [p for _, m in parts for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    holds_first = any(k == 0 for k, _ in parts)
    holds_last = any(k == ranks * per_rank - 1 for k, _ in parts)
    data = _data(a)
    times, turn = [], Turn.from_env(rank)
    for step in range(a.steps + 1):
        batch = data[step * a.batch : (step + 1) * a.batch]
        if turn is not None:
            turn.begin()
        t0 = time.perf_counter()
        opt.zero_grad()
        inputs = (batch[:, :-1],) if holds_first else ()
        schedule.step(*inputs, **({"target": batch[:, 1:]} if holds_last else {}))
        opt.step()
        times.append(time.perf_counter() - t0)
        if turn is not None:
            turn.end()
    if turn is not None:
        turn.begin()  # the release
    dist.barrier()
    if rank == 0:
        write_result(a.out, {"step_s": statistics.median(times[1:])})
    dist.destroy_process_group()


# ---- orchestration ----------------------------------------------------------------------------------------------


def _worker_args(a: argparse.Namespace, worker: str, schedule: str) -> list[str]:
    """The command-line options of a worker process for ``schedule`` on this invocation's model and batch."""
    args = ["--worker", worker, "--schedule", schedule]
    for name in ("model", "hidden", "layers", "d", "heads", "seq", "batch", "microbatches", "steps"):
        args += [f"--{name}", str(getattr(a, name))]
    return args


def _run(a: argparse.Namespace, worker: str, schedule: str = "1f1b") -> dict[str, Any]:
    return run_worker(__file__, _worker_args(a, worker, schedule), ranks=2 if worker == "torch" else 1)


def _run_pair(a: argparse.Namespace) -> float:
    """Step time of the fair baseline while a second copy runs beside it (the slower of the two): what one core
    computes when both are busy, as they are in a pipeline of two (shared caches and memory bandwidth)."""
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: _run(a, "accum")["step_s"], range(2)))
    return max(runs)


def _ideal(config: str, p: int, m: int) -> float:
    """The schedule's own ideal speedup p·(1 − its ideal bubble): p·m/(m+p−1) for GPipe and 1F1B, p·v·m/(v·m+p−1)
    interleaved, p·3m/(3m+p−1) for zero_bubble, and the zero-bubble orders with two stages per rank played out."""
    from lightning_mp.observe.timeline import ideal_bubble

    schedule, v = CONFIGURATIONS[config]
    return p * (1 - ideal_bubble(schedule, p, m, v))


def _argv(a: argparse.Namespace, worker: str, schedule: str, out: Path) -> list[str]:
    return [sys.executable, __file__, "--out", str(out), *_worker_args(a, worker, schedule)]


def _in_lock_step(a: argparse.Namespace, schedule: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The fair baseline, torch.distributed.pipelining and lightning-mp on ``schedule``, taking turns step by step
    (``benchmarks/lockstep.py``): each one's step times after the warm-up, and lightning-mp's own report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: Path(tmp) / f"{name}.json" for name in ("fair", "torch", "lmp")}
        sides = [
            Side("fair", _argv(a, "accum", schedule, out["fair"]), ranks=1),
            Side("torch", _argv(a, "torch", schedule, out["torch"]), ranks=2, rank_envs=process_group_envs(2)),
            Side("lmp", _argv(a, "lmp", schedule, out["lmp"]), ranks=2),  # Lightning launches its second rank
        ]
        times = run_in_lock_step(sides, a.steps + 1, worker_env(), ROOT)
        return {name: t[1:] for name, t in times.items()}, json.loads(out["lmp"].read_text())


def main() -> None:
    a = _args()
    if a.worker:
        torch.set_num_threads(1)
        (_torch_worker if a.worker == "torch" else _lightning_worker)(a)
        return
    p, m = 2, a.microbatches
    shape = {"model": a.model, "layers": a.layers, "d": a.d, "seq": a.seq, "batch": a.batch, "microbatches": m}
    whole, fair, loaded = [], [], []
    for _ in range(a.repeats):  # alternate the baselines too
        whole.append(_run(a, "single")["step_s"])
        fair.append(_run(a, "accum")["step_s"])
        loaded.append(_run_pair(a))
    whole_s = slowdown = None
    if a.repeats > 0:
        whole_s, fair_alone_s, loaded_s = min(whole), min(fair), min(loaded)
        slowdown = loaded_s / fair_alone_s
        print(json.dumps({"config": "one process, whole batch", **shape, "step_s": round(whole_s, 3)}), flush=True)
        row = {"config": "one process, micro-batches accumulated", **shape, "step_s": round(fair_alone_s, 3)}
        print(json.dumps(row), flush=True)
        row = {"config": "two such processes at once (each)", **shape, "step_s": round(loaded_s, 3)}
        print(json.dumps({**row, "slowdown": round(slowdown, 3)}), flush=True)
    for schedule in a.schedules.split(","):
        times, lmp = _in_lock_step(a, schedule)
        fair_s, torch_s, lmp_s = (statistics.median(times[name]) for name in ("fair", "torch", "lmp"))
        ideal = _ideal(schedule, p, m)
        (lmp_schedule, per_rank), torch_name = CONFIGURATIONS[schedule], TORCH_SCHEDULES[schedule][0]
        virtual = f", virtual_stages={per_rank}" if lmp_schedule == "zero_bubble" and per_rank > 1 else ""
        per = "1 stage" if per_rank == 1 else f"{per_rank} stages"
        stages = f", {per} per rank" if torch_name.startswith("ScheduleInterleavedZ") else ""
        for name, t in (
            (f"torch.distributed.pipelining {torch_name}{stages}", torch_s),
            (f"lightning-mp {lmp_schedule}{virtual}", lmp_s),
        ):
            row = {
                "config": name,
                "pp": p,
                **shape,
                "step_s": round(t, 3),
                "fair_s": round(fair_s, 3),
                "speedup": round(fair_s / t, 3),
                "speedup_whole": round(whole_s / t, 3) if whole_s is not None else None,
                "ideal": round(ideal, 3),
                "of_ideal": round(fair_s / t / ideal, 3),
                "of_ideal_loaded": round(fair_s * slowdown / t / ideal, 3) if slowdown is not None else None,
            }
            row = {k: v for k, v in row.items() if v is not None}  # (--repeats 0: no lone baselines)
            if name.startswith("lightning-mp"):
                row["vs_torch"] = round(torch_s / t, 3)
                row["vs_torch_rounds"] = [round(x / y, 3) for x, y in zip(times["torch"], times["lmp"])]
                row["stage_busy_s"] = [lmp["stages"][k]["busy_s"] for k in sorted(lmp["stages"], key=int)]
                row["stage_wait_s"] = [lmp["stages"][k]["wait_s"] for k in sorted(lmp["stages"], key=int)]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

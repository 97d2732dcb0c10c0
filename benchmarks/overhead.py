"""The strategy's own cost: lightning-mp where it has nothing to split, and its per-micro-batch machinery.

Prints one JSON line per measurement (the fastest of ``--repeats`` alternating runs, each the median step after one
warm-up step, one thread per process, CPU):

- ``pp1``: lightning-mp at pp = 1, tp = 1 (one process) against plain Lightning on one device, same model and data:
  ``ratio`` = lightning-mp's steps/s over Lightning's (1.0: no overhead);
- ``metrics``: lightning-mp at pp = 2 with ``pipeline_metrics`` and a ``PipelineTimeline`` on, against both off;
- ``per_microbatch``: a tiny model (compute negligible) at pp = 1, one batch of 16 one-sample micro-batches per
  step, against a plain PyTorch loop doing the same forwards, backwards and optimizer step: the difference per
  micro-batch, in µs, is what Lightning and lightning-mp's runner add to each micro-batch (splitting, capture of
  ``self.log``, loss normalisation, executor); Lightning accumulating the same micro-batches is shown beside it;
- ``per_microbatch_pp2``: the same tiny shape at pp = 2 (its head untied, as torch.distributed.pipelining needs),
  1F1B, against torch.distributed.pipelining's ``Schedule1F1B`` on the same split (``benchmarks/pipeline.py``'s
  workers, ``--rounds`` lock-step rounds): what lightning-mp's stage machinery and messages add per micro-batch over
  torch's, where compute does not hide it.

Usage: ``python benchmarks/overhead.py [--layers 8 --d 512 --seq 128 --batch 32 --steps 5 --measure pp1,...]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import fit_and_time, gpt_arguments, run_if_worker, run_worker, write_result  # noqa: E402

MEASUREMENTS = "pp1,metrics,per_microbatch,per_microbatch_pp2"
TINY = {"layers": 2, "d": 32, "heads": 2, "seq": 16}


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = gpt_arguments(__doc__)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=16, help="for the per-micro-batch measurement")
    p.add_argument("--measure", default=MEASUREMENTS, help="which measurements, comma-separated")
    p.add_argument("--rounds", type=int, default=30, help="lock-step rounds of the pp = 2 per-micro-batch measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model(layers: int, d: int, heads: int, seq: int) -> Any:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=layers, n_embd=d, n_head=heads, block_size=seq))


def _worker(a: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    import lightning_mp

    tiny = a.worker.startswith("tiny")
    shape = TINY if tiny else {"layers": a.layers, "d": a.d, "heads": a.heads, "seq": a.seq}
    batch = a.microbatches if tiny else a.batch
    data = torch.randint(0, 256, ((a.steps + 1) * batch, shape["seq"] + 1), generator=torch.Generator().manual_seed(0))
    model = _model(**shape)
    callbacks = []
    if a.worker == "tiny-torch":
        result = _plain_loop(model, data, a.microbatches, a.steps)
    elif a.worker == "lightning":
        result = fit_and_time(model, DataLoader(data, batch_size=batch), a.steps, "auto", 1)
    elif a.worker == "tiny-lightning":  # one sample per micro-batch, accumulated
        result = fit_and_time(model, DataLoader(data, batch_size=1), a.steps, "auto", 1, accumulate=a.microbatches)
    elif a.worker in ("pp1", "tiny-pp1"):
        m = a.microbatches if tiny else "auto"
        strategy = lightning_mp.ModelParallel(pipeline_parallel_size=1, microbatches=m, balance="uniform")
        result = fit_and_time(model, DataLoader(data, batch_size=batch), a.steps, strategy, 1)
    else:  # pp2-on / pp2-off
        on = a.worker == "pp2-on"
        strategy = lightning_mp.ModelParallel(pipeline_parallel_size=2, balance="uniform", pipeline_metrics=on)
        if on:
            callbacks.append(lightning_mp.PipelineTimeline(dirpath=Path(a.out).parent))
        result = fit_and_time(model, DataLoader(data, batch_size=batch), a.steps, strategy, 2, callbacks=callbacks)
    write_result(a.out, result)


def _plain_loop(model: Any, data: torch.Tensor, microbatches: int, steps: int) -> dict:
    """One optimizer step per ``microbatches`` one-sample forwards and backwards, in plain PyTorch."""
    import statistics
    import time

    opt = model.configure_optimizers()
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        for sample in data[step * microbatches : (step + 1) * microbatches].split(1):
            (model.loss(sample) / microbatches).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:])}


def _run(a: argparse.Namespace, worker: str) -> float:
    args = ["--worker", worker]
    for name in ("layers", "d", "heads", "seq", "batch", "steps", "microbatches"):
        args += [f"--{name}", str(getattr(a, name))]
    return run_worker(__file__, args)["step_s"]


def _compare(a: argparse.Namespace, first: str, second: str) -> tuple[float, float]:
    runs: dict[str, list[float]] = {first: [], second: []}
    for _ in range(a.repeats):  # alternate, so that drifting machine speed hits both alike
        for worker in (first, second):
            runs[worker].append(_run(a, worker))
    return min(runs[first]), min(runs[second])


def main() -> None:
    a = _args()
    if run_if_worker(a, _worker):
        return
    shape = {"layers": a.layers, "d": a.d, "seq": a.seq, "batch": a.batch}
    chosen = a.measure.split(",")
    unknown = sorted(set(chosen) - set(MEASUREMENTS.split(",")))
    if unknown:
        raise SystemExit(f"--measure: unknown {', '.join(unknown)}; choose from {MEASUREMENTS}")
    if "pp1" in chosen:
        lightning, pp1 = _compare(a, "lightning", "pp1")
        row = {"config": "pp1", **shape, "lightning_step_s": round(lightning, 4), "lightning_mp_step_s": round(pp1, 4)}
        print(json.dumps({**row, "ratio": round(lightning / pp1, 3)}), flush=True)
    if "metrics" in chosen:
        on, off = _compare(a, "pp2-on", "pp2-off")
        row = {"config": "metrics", **shape, "on_step_s": round(on, 4), "off_step_s": round(off, 4)}
        print(json.dumps({**row, "ratio": round(off / on, 3)}), flush=True)
    if "per_microbatch" in chosen:
        plain, runner = _compare(a, "tiny-torch", "tiny-pp1")
        accumulated = min(_run(a, "tiny-lightning") for _ in range(a.repeats))
        row = {"config": "per_microbatch", **TINY, "microbatches": a.microbatches, "torch_step_s": round(plain, 4)}
        row.update(lightning_mp_step_s=round(runner, 4), lightning_accumulate_step_s=round(accumulated, 4))
        row["overhead_us_per_microbatch"] = round((runner - plain) / a.microbatches * 1e6, 1)
        print(json.dumps(row), flush=True)
    if "per_microbatch_pp2" in chosen:
        print(json.dumps(_per_microbatch_pp2(a)), flush=True)


def _per_microbatch_pp2(a: argparse.Namespace) -> dict:
    """The tiny model at pp = 2, 1F1B: lightning-mp against torch.distributed.pipelining, in lock step."""
    import statistics

    from benchmarks import pipeline

    shape = ["--layers", str(TINY["layers"]), "--d", str(TINY["d"]), "--heads", str(TINY["heads"])]
    shape += ["--seq", str(TINY["seq"]), "--batch", str(a.microbatches), "--microbatches", str(a.microbatches)]
    times, _ = pipeline._in_lock_step(pipeline._args([*shape, "--steps", str(a.rounds)]), "1f1b")
    torch_s, lmp_s = statistics.median(times["torch"]), statistics.median(times["lmp"])
    row = {"config": "per_microbatch_pp2", **TINY, "microbatches": a.microbatches, "schedule": "1f1b"}
    row.update(torch_step_s=round(torch_s, 4), lightning_mp_step_s=round(lmp_s, 4), vs_torch=round(torch_s / lmp_s, 3))
    row["overhead_us_per_microbatch"] = round((lmp_s - torch_s) / a.microbatches * 1e6, 1)
    return row


if __name__ == "__main__":
    main()

"""Tensor parallelism: forward+backward of one transformer block and of a whole small GPT, tp=2 against one process.

Each case is timed in one process (the baseline, measured in this run) and on 2 ranks (gloo, 1 thread per process)
with lightning-mp's layers (``tp_layers``: plain local shards, explicit all-reduces) and, for the block, with
PyTorch's DTensor styles (``parallelize_module`` with ``ColwiseParallel``/``RowwiseParallel``) on the same shapes.
The ideal is 2× the one-process speed; the per-rank parameter memory is compared with one process (ideal: half).
Each configuration runs ``rounds`` times, alternating, and its fastest round counts. Prints one JSON line per case.

    python -m benchmarks.tensor --dims 512 1024 2048 > benchmarks/results-tensor.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.gpt import GPT, Block, GPTConfig
from lightning_mp.tensor.plan import apply_tensor_parallel, plan_tensor_parallel
from lightning_mp.tensor.shard import TPGroup
from lightning_mp.tensor.vocab_loss import loss_parallel

BATCH, SEQ, LAYERS = 8, 128, 2


class OneBlock(nn.Module):
    """A container around one block, so that the planner finds it as the model's layers."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def _config(d: int) -> GPTConfig:
    return GPTConfig(vocab_size=256, block_size=SEQ, n_layer=LAYERS, n_head=d // 64, n_embd=d)


def _build(case: str, d: int) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    if case == "block":
        return OneBlock(_config(d)), torch.randn(BATCH, SEQ, d)
    return GPT(_config(d)), torch.randint(0, 256, (BATCH, SEQ + 1))


def _step(case: str, model: nn.Module, data: Any) -> None:
    if case == "block":
        model(data).sum().backward()
    else:
        model.loss(data).backward()


def _time(case: str, model: nn.Module, data: Any, steps: int, context: Any = None) -> float:
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        with context() if context else _null():
            _step(case, model, data)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _param_bytes(model: nn.Module) -> int:
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


def _worker(rank: int, world: int, case: str, d: int, steps: int, rounds: int, port: int, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result: dict[str, Any] = {}
    model, data = _build(case, d)
    plan = plan_tensor_parallel(model, "blocks", world)
    state = apply_tensor_parallel(model, plan, TPGroup(dist.group.WORLD, rank, world))
    context = loss_parallel if state.has_head else None
    result["tp_param_bytes"] = _param_bytes(model)
    runs: dict[str, tuple[nn.Module, Any, Any]] = {"tp_s": (model, data, context)}
    if case == "block":  # the same shapes through PyTorch's DTensor styles
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        reference, data = _build(case, d)
        mesh = init_device_mesh("cpu", (world,))
        styles = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(), "mlp.0": ColwiseParallel(),
                  "mlp.2": RowwiseParallel()}  # fmt: skip
        parallelize_module(reference.blocks[0], mesh, styles)
        runs["dtensor_s"] = (reference, data, None)
    for _ in range(rounds):  # alternate, keep each one's fastest round: the machine drifts between runs
        for key, (m, x, ctx) in runs.items():
            result[key] = min(result.get(key, float("inf")), _time(case, m, x, steps, ctx))
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def run_case(case: str, d: int, steps: int, rounds: int, port: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, data = _build(case, d)
    one = min(_time(case, model, data, steps) for _ in range(rounds))
    one_bytes = _param_bytes(model)
    del model
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, case, d, steps, rounds, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    row = {
        "bench": "tensor",
        "case": case,
        "d_model": d,
        "batch": BATCH,
        "seq": SEQ,
        "layers": 1 if case == "block" else LAYERS,
        "one_process_s": round(one, 4),
        "tp2_s": round(result["tp_s"], 4),
        "speedup": round(one / result["tp_s"], 3),
        "ideal_speedup": 2.0,
        "of_ideal": round(one / result["tp_s"] / 2.0, 3),
        "param_mib_one_process": round(one_bytes / 2**20, 2),
        "param_mib_per_rank": round(result["tp_param_bytes"] / 2**20, 2),
        "param_fraction": round(result["tp_param_bytes"] / one_bytes, 4),
    }
    if "dtensor_s" in result:
        row["dtensor_tp2_s"] = round(result["dtensor_s"], 4)
        row["dtensor_speedup"] = round(one / result["dtensor_s"], 3)
        row["ours_vs_dtensor"] = round(result["dtensor_s"] / result["tp_s"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--cases", nargs="+", default=["block", "model"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per configuration; the fastest counts")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = parser.parse_args()
    port = 29600
    for d in args.dims:
        for case in args.cases:
            port += 1
            row = run_case(case, d, args.steps, args.rounds, port)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()

"""Stage balance: a GPT with a large-vocabulary LM head on pp=2, split by every method and by every possible split.

The head (vocabulary × d matrix product and the loss) makes the last stage far costlier than a uniform layer split
assumes. Each configuration trains the same model (examples/gpt.py, untied head) on the same data with 1F1B, 2
ranks with 1 thread each, gloo on CPU; one JSON line per configuration, then a summary line:

- ``uniform``, ``params``, ``time`` (measured at set-up), ``memory``: the balances of ``ModelParallel``;
- ``split [k, n-k]``: every possible split, to find the best one by trying;
- summary: ``time_vs_best`` = best split's step time / time's (target ≥ 0.95), ``time_vs_uniform`` = uniform's
  step time / time's (the speed-up the measured balance buys).

Usage: ``python benchmarks/balance.py [--layers 8 --vocab 32000 --d 512 --seq 64 --batch 16 --microbatches 4]``.
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

from benchmarks.common import fit_and_time, gpt_arguments, run_worker, write_result  # noqa: E402


def _args() -> argparse.Namespace:
    p = gpt_arguments(__doc__, seq=64, batch=16, steps=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--balance", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def _worker(a: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    import lightning_mp
    from examples.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=a.vocab, n_layer=a.layers, n_embd=a.d, n_head=a.heads, block_size=a.seq, tie_weights=False)
    )
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, a.vocab, ((a.steps + 1) * a.batch, a.seq + 1), generator=g)
    balance: Any = json.loads(a.balance) if a.balance.startswith("[") else a.balance
    strategy = lightning_mp.ModelParallel(pipeline_parallel_size=2, microbatches=a.microbatches, balance=balance)
    write_result(a.out, fit_and_time(model, DataLoader(data, batch_size=a.batch), a.steps, strategy, devices=2))


def main() -> None:
    a = _args()
    if a.balance:
        _worker(a)
        return
    shared = []
    for name in ("layers", "vocab", "d", "heads", "seq", "batch", "microbatches", "steps"):
        shared += [f"--{name}", str(getattr(a, name))]
    model = {
        "layers": a.layers,
        "vocab": a.vocab,
        "d": a.d,
        "seq": a.seq,
        "batch": a.batch,
        "microbatches": a.microbatches,
        "pp": 2,
    }
    results = {}
    configs = ["uniform", "params", "time", "memory"] + [json.dumps([k, a.layers - k]) for k in range(1, a.layers)]
    for config in configs:
        r = run_worker(__file__, [*shared, "--balance", config])
        results[config] = r
        label = config if not config.startswith("[") else f"split {config}"
        print(
            json.dumps(
                {
                    "config": label,
                    **model,
                    "balance": r["balance"],
                    "step_s": round(r["step_s"], 3),
                    "stage_busy_s": [r["stages"][k]["busy_s"] for k in sorted(r["stages"], key=int)],
                }
            ),
            flush=True,
        )
    splits = {c: r for c, r in results.items() if c.startswith("[")}
    best = min(splits, key=lambda c: splits[c]["step_s"])
    t = results["time"]["step_s"]
    print(
        json.dumps(
            {
                "summary": True,
                "best_split": json.loads(best),
                "best_step_s": round(splits[best]["step_s"], 3),
                "time_balance": results["time"]["balance"],
                "time_step_s": round(t, 3),
                "time_vs_best": round(splits[best]["step_s"] / t, 3),
                "time_vs_uniform": round(results["uniform"]["step_s"] / t, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

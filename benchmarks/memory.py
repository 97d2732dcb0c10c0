"""Sharded data parallelism: bytes per rank of parameters, gradients and optimizer state at each
``data_parallel_sharding`` level, and the speed each level keeps against ``"none"``.

Two models, the GPT of examples/gpt.py (AdamW, fp32):

- ``predicted``: a model too large to train here (default GPT-2 small's shape: 12 blocks, d 768, vocab 50257, tied
  head; 124 M parameters), built on the meta device and planned with :func:`lightning_mp.dry_run`: the bytes per
  rank its plan reports (``report["data_parallel"]``, Adam's state counted as 2 × the parameters);
- ``measured``: a small one (``--layers --d --heads --seq``) trained for ``--steps`` steps (after one warm-up) at every
  level, each rank adding up the tensors it holds (``numel × element_size``, each tensor once): its parameters
  (the stage's, 0 when released, plus the flat shards the optimizer updates), their ``.grad`` (at the optimizer
  step, after the reduction) and the optimizer's state tensors, after the last step; and the peak of all three
  during a step, sampled after every gradient accumulation of the backward (the flat reduction buckets in flight
  are not seen there: the peak is a lower bound). The plan's prediction for the same model sits beside it.

Per layout (``dp×pp``) every level is compared with ``"none"`` of the same model and layout in the same run:
``*_vs_none`` = bytes / the same bytes at ``"none"``, against the ideal ``1/dp`` wherever the level shards that part
(for parameters at ``"optimizer"``/``"gradients"`` the measured figure includes the shards' own copy: 1 + 1/dp);
``params_per_gib`` = the model's parameters that one GiB of rank memory holds at this level (parameters, gradients
and optimizer state of the fullest rank; between steps, and ``params_per_gib_step`` at the step's peak);
``speed_vs_none`` = steps/s over ``"none"``'s. The issue's goals: optimizer state within 5% of 1/dp of ``"none"``'s at
``"optimizer"`` (``optimizer_vs_ideal``), and the most parameters per GiB at ``"full"``. Prints one JSON line per
case:

    python benchmarks/memory.py > benchmarks/results-memory.jsonl && python benchmarks/render_tables.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import fit_and_time, gpt_arguments, run_worker, write_result  # noqa: E402

LEVELS = ("none", "optimizer", "gradients", "full")
PARTS = ("parameters", "gradients", "optimizer")
SHARDED_AT = {
    "parameters": ("full",),
    "gradients": ("gradients", "full"),
    "optimizer": ("optimizer", "gradients", "full"),
}


def _args() -> argparse.Namespace:
    p = gpt_arguments(__doc__, seq=64, batch=4, steps=3)
    p.set_defaults(layers=4, d=256, heads=4)
    p.add_argument("--layouts", default="2x1,4x1,2x2", help="dp×pp layouts, comma-separated")
    p.add_argument("--big", default="12,768,12,50257,1024", help="the predicted model: layers,d,heads,vocab,seq")
    p.add_argument("--microbatches", type=int, default=2, help="per step, with pp > 1")
    p.add_argument("--repeats", type=int, default=1, help="runs per level, alternating; the fastest counts")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dp", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def _gpt(layers: int, d: int, heads: int, vocab: int, seq: int) -> Any:
    from examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=heads, block_size=seq))


def _strategy_options(dp: int, pp: int, level: str, microbatches: int) -> dict[str, Any]:
    return {
        "pipeline_parallel_size": pp,
        "data_parallel_size": dp,
        "data_parallel_sharding": level,
        "balance": "params",  # the same split in training and in dry_run
        "microbatches": microbatches if pp > 1 else 1,
    }


# ---- worker: one level, one layout, really trained ----------------------------------------------------------------


def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if t is not None else 0


class HeldBytes(L.Callback):
    """What this rank holds, by adding up its tensors (each once): parameters (the stage's and the optimizer's flat
    shards), their gradients and the optimizer state; at the optimizer step, after the step, and at the peak
    sampled after each gradient accumulation of a step. ``ranks``: every rank's figures, after training."""

    def __init__(self) -> None:
        self.peak = 0
        self.at_step: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.ranks: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.trainer = trainer
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _: self._sample())

    def _held(self) -> dict[str, int]:
        optimizer = getattr(self.trainer.optimizers[0], "_optimizer", self.trainer.optimizers[0])
        tensors = {id(p): p for p in self.trainer.lightning_module.parameters()}
        tensors.update({id(p): p for g in optimizer.param_groups for p in g["params"]})
        state = {id(v): v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
        return {
            "parameters": sum(_nbytes(p) for p in tensors.values()),
            "gradients": sum(_nbytes(p.grad) for p in tensors.values()),
            "optimizer": sum(_nbytes(v) for v in state.values()),
        }

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(self._held().values()))

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        self.at_step = self._held()  # gradients reduced (and, above "none", sharded), not yet applied
        self.peak = max(self.peak, sum(self.at_step.values()))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.after = self._held()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        mine = {
            "rank": trainer.global_rank,
            "stage": getattr(trainer.strategy, "stage", 0),
            "parameters": self.after["parameters"],
            "gradients": self.at_step["gradients"],
            "optimizer": self.after["optimizer"],
            "gradients_after_step": self.after["gradients"],
            "step_peak": self.peak,
        }
        self.ranks = [None] * trainer.world_size  # type: ignore[list-item]
        torch.distributed.all_gather_object(self.ranks, mine)


def _worker(a: argparse.Namespace) -> None:
    """Every level in turn on the same processes (``--repeats`` rounds, alternating); rank 0 writes each level's
    runs."""
    from torch.utils.data import DataLoader

    import lightning_mp

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, ((a.steps + 1) * a.batch * a.dp, a.seq + 1), generator=g)
    runs: dict[str, list[Any]] = {level: [] for level in LEVELS}
    for _ in range(a.repeats):
        for level in LEVELS:
            model = _gpt(a.layers, a.d, a.heads, 256, a.seq)
            strategy = lightning_mp.ModelParallel(**_strategy_options(a.dp, a.pp, level, a.microbatches))
            probe = HeldBytes()
            loader = DataLoader(data, batch_size=a.batch)  # per replica: Lightning gives each its shard
            report = lambda _, probe=probe: {"ranks": probe.ranks}  # noqa: E731
            runs[level].append(fit_and_time(model, loader, a.steps, strategy, a.dp * a.pp, report, callbacks=[probe]))
    write_result(a.out, runs if runs["none"][0] is not None else None)


# ---- orchestration ------------------------------------------------------------------------------------------------


def _predicted(model: Any, dp: int, pp: int, level: str, microbatches: int) -> list[dict[str, int]]:
    """Bytes per rank of each stage, as the plan reports them."""
    import lightning_mp

    _, report = lightning_mp.dry_run(model, devices=dp * pp, **_strategy_options(dp, pp, level, microbatches))
    return report["data_parallel"]["per_rank"]


def _fullest(ranks: list[dict[str, Any]], key: str = "total") -> dict[str, Any]:
    for r in ranks:
        r["total"] = sum(r[part] for part in PARTS)
    return max(ranks, key=lambda r: r[key])


def _row(case: dict[str, Any], level: str, dp: int, got: dict[str, Any], none: dict[str, Any]) -> dict[str, Any]:
    """One JSON line: the fullest rank's bytes, against the same at "none" and the ideal."""
    row = {**case, "level": level}
    for part in PARTS:
        row[part] = got[part]
        row[f"{part}_vs_none"] = round(got[part] / none[part], 4)
        row[f"{part}_ideal"] = round(1 / dp, 4) if level in SHARDED_AT[part] else 1.0
    row["optimizer_vs_ideal"] = round(row["optimizer_vs_none"] / row["optimizer_ideal"], 4)
    row["total"] = got["total"]
    row["params_per_gib"] = round(case["params_total"] * 2**30 / got["total"])
    if "step_peak" in got:
        row["step_peak"] = got["step_peak"]
        row["params_per_gib_step"] = round(case["params_total"] * 2**30 / got["step_peak"])
    return row


def _layouts(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in spec.split(",")]  # type: ignore[misc]


def main() -> None:
    a = _args()
    if a.worker:
        torch.set_num_threads(1)
        _worker(a)
        return
    layers, d, heads, vocab, seq = (int(x) for x in a.big.split(","))
    with torch.device("meta"):
        big = _gpt(layers, d, heads, vocab, seq)
    small = _gpt(a.layers, a.d, a.heads, 256, a.seq)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    shapes = {
        "predicted": {"layers": layers, "d": d, "vocab": vocab, "params_total": count(big)},
        "measured": {"layers": a.layers, "d": a.d, "vocab": 256, "params_total": count(small)},
    }
    for dp, pp in _layouts(a.layouts):
        layout = {"dp": dp, "pp": pp}
        # predicted: the plan of the large model on the meta device
        case = {"bench": "memory", "source": "predicted", **shapes["predicted"], **layout}
        planned = {level: _fullest(_predicted(big, dp, pp, level, a.microbatches)) for level in LEVELS}
        for level in LEVELS:
            print(json.dumps(_row(case, level, dp, planned[level], planned["none"])), flush=True)
        # measured: the small model trained at every level, in one set of processes (alternating when repeated)
        args = ["--worker", "--dp", str(dp), "--pp", str(pp)]
        for name in ("layers", "d", "heads", "seq", "batch", "steps", "microbatches", "repeats"):
            args += [f"--{name}", str(getattr(a, name))]
        runs = run_worker(__file__, args)
        best = {level: min(rs, key=lambda r: r["step_s"]) for level, rs in runs.items()}
        held = {level: _fullest(best[level]["ranks"]) for level in LEVELS}
        case = {"bench": "memory", "source": "measured", **shapes["measured"], **layout, "seq": a.seq}
        case["batch_per_replica"] = a.batch
        for level in LEVELS:
            row = _row(case, level, dp, held[level], held["none"])
            plan = _fullest(_predicted(small, dp, pp, level, a.microbatches))
            row["predicted"] = {part: plan[part] for part in PARTS}
            row["gradients_after_step"] = max(r["gradients_after_step"] for r in best[level]["ranks"])
            row["steps_per_s"] = round(1 / best[level]["step_s"], 3)
            row["speed_vs_none"] = round(best["none"]["step_s"] / best[level]["step_s"], 3)
            row["step_s_runs"] = [round(r["step_s"], 4) for r in runs[level]]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

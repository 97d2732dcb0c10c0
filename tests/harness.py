"""Runs training jobs for the tests, one process per rank, and saves what each rank saw.

Usage: ``python tests/harness.py JOBS.json OUT_DIR``. JOBS.json holds a list of jobs; each runs ``trainer.fit`` on a
test model (tests/models.py). With ``devices`` > 1 Lightning's own launcher starts the other ranks, which re-run this
script. Every rank writes ``OUT_DIR/<job>/rank<r>.pt``: the loss returned by each step, the logged metrics, and the
rank's parameters by name. A job without ``strategy`` runs in one process with no strategy: the reference. Jobs run
on the CPU unless ``"accelerator": "gpu"`` (one GPU per rank, NCCL between them; tests/test_cuda.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_mp
from tests.models import make_model


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.rss: list[int] = []  # resident bytes after each step (Linux)
        self.scales: list[float | None] = []  # the fp16 loss scale after each step (None without a scaler)
        self.messages: list[dict[str, int]] = []  # point-to-point operations posted so far, after each step

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(float(scaler.get_scale()) if scaler is not None else None)
        runner = getattr(trainer.strategy, "runner", None)
        if runner is not None:
            self.messages.append(dataclasses.asdict(runner.executor.p2p.counts))
        statm = Path("/proc/self/statm")
        if statm.exists():
            self.rss.append(int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def run_job(job: dict[str, Any], out_dir: Path) -> None:
    torch.set_num_threads(1)
    accelerator = job.get("accelerator", "cpu")
    if accelerator == "gpu":  # plain fp32 matrix products (no TF32), as on the CPU: exactness is tested to 1e-5
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with torch.device("meta") if job.get("meta") else contextlib.nullcontext():
        model = make_model(job["model"], **job.get("model_kwargs", {}))
    strategy_kwargs = job.get("strategy")
    devices = job.get("devices", 1)
    if strategy_kwargs is None:
        strategy: Any = "auto"
    elif strategy_kwargs == "registered":
        strategy = "model_parallel"
    elif isinstance(strategy_kwargs, str):  # a Lightning strategy by name, e.g. "ddp" (a reference for dp > 1)
        strategy = strategy_kwargs
    else:
        strategy = lightning_mp.ModelParallel(**strategy_kwargs)
    recorder = Recorder()
    callbacks: list[L.Callback] = [recorder]
    plugins = []
    if job.get("fp16_scaler"):  # "16-mixed" with an explicit CPU GradScaler: {"init_scale": ...}
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", **job["fp16_scaler"])
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    if job.get("checkpoint_io") == "distributed":  # one plain process reading a lightning-mp checkpoint directory
        from lightning_mp.checkpoint.consolidate import DistributedCheckpointIO

        plugins.append(DistributedCheckpointIO())
    if job.get("early_stopping"):
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(**job["early_stopping"]))
    if job.get("timeline"):
        from lightning_mp.observe.timeline import PipelineTimeline

        callbacks.append(PipelineTimeline(dirpath=out_dir / job["name"], steps=2))
    summary = None
    if job.get("summary"):  # PipelineSummary: step time, every rank's busy/wait (and GPU-Util on a GPU)
        from lightning_mp.observe.callbacks import PipelineSummary

        callbacks.append(summary := PipelineSummary())
    if job.get("crash_in_save"):
        _crash_in_save(**job["crash_in_save"])
    if job.get("checkpoint_every"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(
                dirpath=out_dir / job["name"] / "ckpts",
                every_n_train_steps=job["checkpoint_every"],
                save_top_k=-1,
                filename="{step}",
            )
        )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=job.get("max_steps", 4),
        # "csv_logger": a CSVLogger writing OUT_DIR/<job>/csv/metrics.csv
        logger=CSVLogger(out_dir / job["name"], name="csv", version="") if job.get("csv_logger") else False,
        enable_checkpointing=bool(job.get("checkpoint_every")),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=plugins,
        num_sanity_val_steps=0,
        limit_val_batches=job.get("limit_val_batches", 0),
        val_check_interval=job.get("val_check_interval"),
        **job.get("trainer", {}),
    )
    order = job.get("replica_order")
    if order:
        model.train_dataloader = _replica_ordered_loader(model, **order)  # type: ignore[method-assign]
    resume = job.get("resume_from")
    with _fake_gpu_util(job.get("fake_gpu_util")):
        trainer.fit(model, ckpt_path=str(out_dir / resume) if resume else None)
    if job.get("save_to"):
        trainer.save_checkpoint(out_dir / job["save_to"])
    rank = trainer.global_rank
    predictions = trainer.predict(model, model.val_dataloader()) if job.get("predict") else None
    result = {
        "losses": recorder.losses,
        "rss": recorder.rss,
        "scales": recorder.scales,
        "messages": recorder.messages,
        "metrics": recorder.metrics,
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "params": _parameters(trainer, model),
        "stage": getattr(trainer.strategy, "stage", 0),
        "predictions": predictions,
        "summary": summary.summary if summary is not None else None,
    }
    target = out_dir / job["name"]
    target.mkdir(parents=True, exist_ok=True)
    torch.save(result, target / f"rank{rank}.pt")


def _parameters(trainer: L.Trainer, model: L.LightningModule) -> dict[str, torch.Tensor]:
    """The rank's parameters by name; tensor-parallel shards gathered whole."""
    full = getattr(trainer.strategy, "full_parameters", None)
    params = full() if full is not None else {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().cpu() for n, p in params.items()}  # GPU runs: readable where the test process compares


@contextlib.contextmanager
def _fake_gpu_util(readings: list[float] | None) -> Any:
    """With ``readings`` (one per global rank): NVML's GPU utilization faked on the CPU, rank r reading
    ``readings[r]``, so that its path to the logs (a real collective over the ranks) is tested without a GPU."""
    if readings is None:
        yield
        return
    import lightning_mp.observe.monitor as monitor
    import lightning_mp.runtime.clock as clock

    saved = monitor.reads_utilization, clock.device_utilization
    monitor.reads_utilization = lambda device: True
    clock.device_utilization = lambda device: readings[torch.distributed.get_rank()]
    try:
        yield
    finally:
        monitor.reads_utilization, clock.device_utilization = saved


def _crash_in_save(rank: int, call: int) -> None:
    """Make global rank ``rank`` die in the middle of the ``call``-th checkpoint save (the others are writing)."""
    import lightning_mp.checkpoint.distributed as checkpoint

    write = checkpoint.write_tensors
    calls = [0]

    def crashing(tensors: Any, directory: Path) -> None:
        calls[0] += 1
        if calls[0] == call and torch.distributed.get_rank() == rank:
            os._exit(7)
        write(tensors, directory)

    checkpoint.write_tensors = crashing


def _replica_ordered_loader(model: L.LightningModule, replicas: int, batch_size: int) -> Any:
    """The one-process equivalent of ``replicas`` data-parallel ranks under Lightning's DistributedSampler: step k
    sees replica 0's batch k, then replica 1's, and so on; each epoch in that epoch's order (Lightning calls the
    sampler's ``set_epoch``, as it does the DistributedSampler's), so a run over several epochs, or resumed in a
    later one, sees what the replicas saw."""
    from torch.utils.data import DataLoader

    sampler = _ReplicaOrder(model.dataset(0), replicas, batch_size)

    def loader() -> DataLoader:
        return DataLoader(sampler.dataset, batch_size=batch_size * replicas, sampler=sampler, shuffle=False)

    return loader


class _ReplicaOrder(torch.utils.data.Sampler):
    """Indices in the order of :func:`_replica_ordered_loader`, for the epoch last given to ``set_epoch``."""

    def __init__(self, dataset: Any, replicas: int, batch_size: int) -> None:
        self.dataset, self.replicas, self.batch_size, self.epoch = dataset, replicas, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        from torch.utils.data import DistributedSampler

        shards = []
        for r in range(self.replicas):
            sampler = DistributedSampler(self.dataset, num_replicas=self.replicas, rank=r, shuffle=True, seed=0)
            sampler.set_epoch(self.epoch)
            shards.append(list(sampler))
        order = []
        for start in range(0, len(shards[0]), self.batch_size):
            for shard in shards:
                order.extend(shard[start : start + self.batch_size])
        return order

    def __iter__(self) -> Any:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    is_child = os.environ.get("LOCAL_RANK", "0") != "0"
    for job in jobs:
        if is_child and job.get("devices", 1) == 1:
            continue  # single-process references run in the launching process only
        run_job(job, out_dir)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

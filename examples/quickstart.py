"""Quickstart: an unmodified LightningModule (examples/gpt.py) trained with ``strategy=lightning_mp.ModelParallel``.

A byte-level GPT learns English text that ships with Python (no download), split into 2 pipeline stages on CPU.
At the end it prints steps/s, each stage's busy time and the stage plan.

    python examples/quickstart.py                                     # 2 processes, pp=2, 1F1B
    python examples/quickstart.py strategy.schedule=gpipe strategy.microbatches=8 trainer.max_steps=100
    python examples/quickstart.py dry_run=true strategy.balance=time   # the stage plan only, also as plan.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_mp  # registers "model_parallel"
from examples.gpt import GPT, GPTConfig
from examples.text_data import ByteWindows, python_docs_text
from lightning_mp import PipelineSummary, PipelineTimeline, build_strategy
from lightning_mp.integrations.config import check_strategy_config, one_line_errors


@hydra.main(config_path="../conf", config_name="quickstart", version_base="1.3")
@one_line_errors  # a ConfigError or ModelSplitError: one line, exit status 1
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads_per_rank)
    L.seed_everything(cfg.seed, verbose=False)
    data = ByteWindows(python_docs_text(), cfg.model.block_size)
    held_out = len(data) // 20
    train = Subset(data, range(held_out, len(data)))
    val = Subset(data, range(held_out))
    m = cfg.model
    model = GPT(GPTConfig(n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, block_size=m.block_size), lr=m.lr)
    if cfg.dry_run:  # the plan only: no processes, no training
        strategy_args = check_strategy_config(cfg.strategy)  # the same options training would use
        strategy_args.pop("_target_", None)
        batch = next(iter(DataLoader(train, batch_size=cfg.data.batch_size)))
        plan, report = lightning_mp.dry_run(model, batch, devices=cfg.trainer.devices, **strategy_args)
        print(plan.format())
        out = Path(HydraConfig.get().runtime.output_dir) / "plan.json"
        out.write_text(json.dumps(report, indent=2))
        print(f"plan written to {out}")
        return
    out = Path(HydraConfig.get().runtime.output_dir)
    callbacks = [PipelineSummary(), PipelineTimeline(dirpath=out)]  # timeline.json / .png in the output directory
    trainer = L.Trainer(strategy=build_strategy(cfg.strategy), callbacks=callbacks, **cfg.trainer)
    trainer.fit(
        model,
        DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True),
        DataLoader(val, batch_size=cfg.data.batch_size),
    )


if __name__ == "__main__":
    main()

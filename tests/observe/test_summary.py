"""The console of a split model: a summary of the whole model per stage and rank, a progress bar without "0/-2"."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar

from lightning_mp.observe.summary import SplitModelSummary, StepProgressBar, format_split_summary


def _plan() -> SimpleNamespace:
    rows = [{"stage": 0, "layers": "blocks.0..blocks.2"}, {"stage": 1, "layers": "blocks.3..blocks.5"}]
    return SimpleNamespace(param_counts=[17_241_984, 5_473_157], num_stages=2, describe=lambda: rows)


def test_the_summary_shows_every_stage_and_what_each_rank_holds() -> None:
    layout = SimpleNamespace(dp=1, pp=2, tp=2)
    held = [(0, 0, 8_700_000, 8_700_000), (1, 0, 8_600_000, 8_600_000)]  # (rank, stage, held, trainable)
    held += [(2, 1, 2_800_000, 2_700_000), (3, 1, 2_700_000, 2_700_000)]
    text = format_split_summary(L.LightningModule(), _plan(), held, layout)
    assert "LightningModule, 22.7 M parameters in 2 stages (dp=1 × pp=2 × tp=2)" in text
    lines = text.splitlines()
    assert "17.2 M" in lines[2] and "blocks.0..blocks.2" in lines[2]
    assert "0: 8.7 M (8.7 M), 1: 8.6 M (8.6 M)" in lines[2]
    assert "5.5 M" in lines[3] and "2: 2.8 M (2.7 M), 3: 2.7 M (2.7 M)" in lines[3]
    assert isinstance(SplitModelSummary(), ModelSummary)


def test_the_progress_bar_says_epoch_without_minus_two() -> None:
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # only max_steps bounds the run
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
    assert isinstance(bar, RichProgressBar)

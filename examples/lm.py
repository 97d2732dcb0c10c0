"""A causal language model (GPT-2, LLaMA and their families, via Hugging Face transformers) as a plain
LightningModule: nothing in it knows about model parallelism."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics.text import Perplexity

from examples.hf import build
from examples.optim import adamw_with_warmup


class CausalLanguageModel(L.LightningModule):
    """Fine-tunes ``name_or_path`` (``from_pretrained``), or trains a model built from ``config`` (no download).

    Args:
        name_or_path: a hub name ("gpt2", "HuggingFaceTB/SmolLM2-135M") or a local directory; None: use ``config``.
        config: ``transformers.AutoConfig.for_model`` arguments (``model_type`` and sizes) for a model from scratch.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.save_hyperparameters()
        if name_or_path:
            self.model = build(AutoModelForCausalLM.from_pretrained, name_or_path)
        else:
            self.model = build(AutoModelForCausalLM.from_config, AutoConfig.for_model(**(config or {})))
        self.val_perplexity = Perplexity()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch, use_cache=False).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch, use_cache=False)
        self.log("val_loss", out.loss, prog_bar=True)
        # next-token perplexity: logits at t predict the label at t + 1
        self.val_perplexity(out.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val_perplexity", self.val_perplexity)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        return adamw_with_warmup(self, h.lr, h.weight_decay, h.warmup_steps)

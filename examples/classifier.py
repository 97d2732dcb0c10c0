"""A sequence classifier (BERT family, via Hugging Face transformers) as a plain LightningModule: nothing in it
knows about model parallelism."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from examples.hf import build
from examples.optim import adamw_with_warmup


class TextClassifier(L.LightningModule):
    """Fine-tunes ``name_or_path`` with a fresh classification head of ``num_labels`` outputs.

    Args:
        name_or_path: a hub name ("bert-base-uncased") or a local directory holding a pretrained encoder.
        num_labels: classes.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up.
    """

    def __init__(
        self, name_or_path: str, num_labels: int, lr: float = 5e-5, weight_decay: float = 0.01, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.save_hyperparameters()
        # the classification head is new: trained here from scratch (transformers' load report would list it)
        self.model = build(AutoModelForSequenceClassification.from_pretrained, name_or_path, num_labels=num_labels)
        self.train_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.val_f1 = MulticlassF1Score(num_labels, average="macro")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.train_accuracy(out.logits.argmax(-1), batch["labels"])
        self.log("train_loss", out.loss, prog_bar=True)
        self.log("train_accuracy", self.train_accuracy)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        predictions = out.logits.argmax(-1)
        self.val_accuracy(predictions, batch["labels"])
        self.val_f1(predictions, batch["labels"])
        self.log("val_loss", out.loss)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)
        self.log("val_f1", self.val_f1)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        return adamw_with_warmup(self, h.lr, h.weight_decay, h.warmup_steps)

"""Tiny models and data for the tests: each a LightningModule written as a Lightning user would write it."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB = 64


class TokenData(Dataset):
    """Token sequences whose length changes every ``batch_size`` samples (so between batches, not within one)."""

    def __init__(self, n: int, batch_size: int, lengths: tuple[int, ...] = (8, 12, 6), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [
            torch.randint(0, VOCAB, (lengths[(i // batch_size) % len(lengths)],), generator=g) for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.items[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class VectorData(Dataset):
    def __init__(self, n: int, dim: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Base(L.LightningModule):
    def __init__(
        self,
        batch_size: int = 8,
        n: int = 36,
        lr: float = 0.1,
        optimizer: str = "sgd",
        lengths: tuple[int, ...] = (8, 12, 6),
        shuffle: str | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.n, self.lr, self.optimizer_name = batch_size, n, lr, optimizer
        self.lengths = tuple(lengths)
        self.shuffle = shuffle  # None, "global" (the global torch RNG) or "generator" (a seeded DataLoader generator)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

    def dataset(self, seed: int) -> Dataset:
        return TokenData(self.n, self.batch_size, self.lengths, seed=seed)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(7) if self.shuffle == "generator" else None
        return DataLoader(self.dataset(0), batch_size=self.batch_size, shuffle=bool(self.shuffle), generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset(1), batch_size=self.batch_size, shuffle=False)

    def lm_step(self, batch: dict, prefix: str) -> torch.Tensor:
        loss = self(batch)
        self.log(f"{prefix}_loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.lm_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.lm_step(batch, "val")


class SequentialNet(Base):
    """A plain nn.Sequential classifier on (x, y) tuple batches."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.net = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)], nn.Linear(16, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def dataset(self, seed: int) -> Dataset:
        return VectorData(self.n, seed=seed)

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"logits": self.net(x), "target": y}


class ConfiguredNet(SequentialNet):
    """Builds its layers in ``configure_model`` on the meta device, as for a model larger than one process."""

    def __init__(self, **kw: Any) -> None:
        Base.__init__(self, **kw)
        self.loss_fn = nn.CrossEntropyLoss()
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            with torch.device("meta"):
                layers = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)]
                self.net = nn.Sequential(*layers, nn.Linear(16, 4))


class WideNet(SequentialNet):
    """A wide MLP classifier on (x, y) batches, for GPU runs: every message between stages holds micro-batch × width
    values (1,024 samples × 4,096 fp32 = 16 MiB)."""

    def __init__(self, width: int = 4096, layers: int = 4, **kw: Any) -> None:
        Base.__init__(self, **kw)
        self.width = width
        blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)]
        self.net = nn.Sequential(*blocks, nn.Linear(width, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def dataset(self, seed: int) -> Dataset:
        return VectorData(self.n, dim=self.width, seed=seed)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(Base):
    """A self-contained GPT with a tied LM head; blocks take an extra argument (the causal mask)."""

    def __init__(self, d: int = 32, layers: int = 4, heads: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(32, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.wte.weight
        for embedding in (self.wte, self.wpe):  # GPT-style scale: the first loss is about ln(VOCAB) at any width
            nn.init.normal_(embedding.weight, std=0.02)

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token + position embeddings, and the causal mask every block takes."""
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        return x, torch.triu(torch.full((t, t), float("-inf"), device=ids.device), diagonal=1)

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return block(x, mask)

    def lm_loss(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln_f(x))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        x, mask = self.embed(ids)
        for block in self.blocks:
            x = self.run_block(block, x, mask)
        return self.lm_loss(x, ids)


class FrozenBottomGPT(TinyGPT):
    """Fine-tuning with the embeddings and the first half of the blocks frozen (no gradient leaves stage 0)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        for module in (self.wte, self.wpe, *self.blocks[: len(self.blocks) // 2]):
            module.requires_grad_(False)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class ReentrantCheckpointGPT(TinyGPT):
    """Calls its blocks through torch.utils.checkpoint with use_reentrant=True (hides the blocks' outputs' history)."""

    def run_block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=True)


class HFCausalLM(Base):
    """A Hugging Face causal LM (GPT-2 or LLaMA) built from a small config, called with dict batches."""

    def __init__(self, family: str = "gpt2", layers: int = 4, checkpointing: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        if family == "gpt2":
            config = GPT2Config(
                vocab_size=VOCAB,
                n_positions=32,
                n_embd=32,
                n_layer=layers,
                n_head=2,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
            )
            self.model = GPT2LMHeadModel(config)
        else:
            config = LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
                tie_word_embeddings=True,
            )
            self.model = LlamaForCausalLM(config)
        if checkpointing:
            self.model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**batch, use_cache=False).loss


class HFBertClassifier(Base):
    """A Hugging Face BERT sequence classifier (untied, pooler after the encoder)."""

    def __init__(self, layers: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.model = BertForSequenceClassification(config)

    def forward(self, batch: dict) -> torch.Tensor:
        labels = batch["labels"][:, 0] % 3
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


class BertWithMetrics(HFBertClassifier):
    """Logs torchmetrics objects as a Lightning user would: train F1 per epoch, validation accuracy and F1."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.train_f1 = MulticlassF1Score(3, average="macro")
        self.val_accuracy = MulticlassAccuracy(3, average="micro")
        self.val_f1 = MulticlassF1Score(3, average="macro")

    def _outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = batch["labels"][:, 0] % 3
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        return out.loss, out.logits.argmax(-1), labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, predictions, labels = self._outputs(batch)
        self.train_f1(predictions, labels)
        self.log("train_loss", loss)
        self.log("train_f1", self.train_f1, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, predictions, labels = self._outputs(batch)
        self.val_accuracy(predictions, labels)
        self.val_f1(predictions, labels)
        self.log("val_loss", loss)
        self.log("val_accuracy", self.val_accuracy)
        self.log("val_f1", self.val_f1)


class ExampleGPT(Base):
    """The self-contained GPT of examples/gpt.py (fused q/k/v in one nn.Linear, tied head), on token batches."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        from examples.gpt import GPT, GPTConfig

        self.gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=4, n_head=2, n_embd=32))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.gpt.loss(batch["input_ids"])


MODELS = {
    "sequential": SequentialNet,
    "gpt": TinyGPT,
    "hf_gpt2": lambda **kw: HFCausalLM(family="gpt2", **kw),
    "hf_llama": lambda **kw: HFCausalLM(family="llama", **kw),
    "hf_bert": HFBertClassifier,
    "example_gpt": ExampleGPT,
    "hf_bert_metrics": BertWithMetrics,
    "configured": ConfiguredNet,
    "wide": WideNet,
}


def make_model(name: str, seed: int = 0, **kw: Any) -> L.LightningModule:
    """The named test model, initialized from ``seed``."""
    torch.manual_seed(seed)
    return MODELS[name](**kw)


class Unsplittable(Base):
    """No repeated blocks: one linear layer."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.linear = nn.Linear(16, 4)

    def dataset(self, seed: int) -> Dataset:
        return VectorData(self.n, seed=seed)

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.linear(x), y)


class CallsABlockTwice(SequentialNet):
    """Runs its first block twice: cannot be cut between blocks."""

    def forward(self, batch: Any) -> torch.Tensor:
        x, y = batch
        x = self.net[0](x)
        for layer in self.net:
            x = layer(x)
        return self.loss_fn(x[:, :4], y)


class FailsMidTraining(TinyGPT):
    """Rank ``rank`` exits (``os._exit``), is killed (SIGKILL), hangs, or raises at training step ``step``."""

    def __init__(self, rank: int = 1, step: int = 2, mode: str = "exit", **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_rank, self.fail_step, self.fail_mode = rank, step, mode

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_rank == self.fail_rank and batch_idx == self.fail_step:
            import os
            import signal
            import time

            if self.fail_mode == "exit":
                os._exit(3)
            if self.fail_mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail_mode == "hang":
                time.sleep(600)
            raise RuntimeError("injected failure")
        return super().training_step(batch, batch_idx)


class EmbeddingSkipGPT(TinyGPT):
    """Adds the input embeddings again after the blocks: a connection around the layer container."""

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        emb, mask = self.embed(ids)
        x = emb
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_loss(x + emb, ids)


MODELS.update(
    bypass=EmbeddingSkipGPT,
    unsplittable=Unsplittable,
    twice=CallsABlockTwice,
    fails=FailsMidTraining,
    frozen=FrozenBottomGPT,
    reentrant=ReentrantCheckpointGPT,
)


def _register_zoo() -> None:
    from tests.zoo import all_models  # the public-model families (tests/zoo/), which build on the classes above

    MODELS.update(all_models())


_register_zoo()

"""A self-contained GPT as a plain LightningModule (nothing lightning-mp-specific), used by the quickstart and the
benchmarks. Byte-level: the vocabulary is the 256 byte values, so any text trains it without a tokenizer download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    tie_weights: bool = True
    mlp: str = "gelu"  # "gelu" (GPT-2: LayerNorm, 4·d GELU MLP) or "swiglu" (LLaMA-style: RMSNorm, SwiGLU MLP)
    hidden: int | None = None  # the MLP's width (default 4·n_embd)


class CausalSelfAttention(nn.Module):
    """Written in per-head terms (``head_dim`` and ``-1`` views, as Hugging Face models are): tensor parallelism then
    runs it unmodified on a rank's share of the heads."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=2)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) · up(x))."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.hidden or 4 * cfg.n_embd
        norm = nn.RMSNorm if cfg.mlp == "swiglu" else nn.LayerNorm
        self.ln_1 = norm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm(cfg.n_embd)
        if cfg.mlp == "swiglu":
            self.mlp: nn.Module = SwiGLU(cfg.n_embd, hidden)
        else:
            self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(L.LightningModule):
    """Next-byte prediction. Batches are (B, T+1) tensors of byte ids: inputs ``[:, :-1]``, targets ``[:, 1:]``."""

    def __init__(self, cfg: GPTConfig | None = None, lr: float = 3e-4) -> None:
        super().__init__()
        self.cfg = cfg or GPTConfig()
        self.lr = lr
        c = self.cfg
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = (nn.RMSNorm if c.mlp == "swiglu" else nn.LayerNorm)(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)

    def loss(self, batch: Tensor) -> Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_bits_per_byte", loss / math.log(2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)

"""Tiny models of public families for the tensor-parallel tests: Hugging Face LLaMA (+ PEFT LoRA), Gemma, Qwen3,
Qwen2, Phi, Phi-3, GPT-NeoX, T5, litgpt's ``GPT``, and two blocks written by hand (a SwiGLU whose layers are called
``gate``, ``up``, ``down``; a fused gate/up ``Wi`` split by ``chunk(2)``). Each is built offline from a small config,
with dropout off."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tests.models import VOCAB, Base

WIDTH, HIDDEN, CONTEXT = 32, 64, 64


def _llama(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _gemma(layers: int) -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=CONTEXT, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GemmaForCausalLM(config)


def _qwen3(layers: int) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen3ForCausalLM(config)


def _phi3(layers: int) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return Phi3ForCausalLM(config)


def _gpt_neox(layers: int) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=CONTEXT, hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GPTNeoXForCausalLM(config)


def _qwen2(layers: int) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(  # biases on q, k and v (none on o); grouped key/value heads; an untied head
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def _phi(layers: int) -> nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(  # attention and MLP side by side on one LayerNorm; partial rotary; biases everywhere
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=CONTEXT, partial_rotary_factor=0.5, resid_pdrop=0.0,
        embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return PhiForCausalLM(config)


_HF = {
    "llama": _llama,
    "gemma": _gemma,
    "qwen3": _qwen3,
    "qwen2": _qwen2,
    "phi": _phi,
    "phi3": _phi3,
    "gpt_neox": _gpt_neox,
}


class HFFamilyLM(Base):
    """A Hugging Face causal LM of ``family`` from a tiny config; ``lora``: PEFT LoRA on the attention's query,
    value and output projections and the MLP's down projection (column- and row-parallel bases), only the LoRA
    parameters trained."""

    def __init__(self, family: str = "llama", layers: int = 4, lora: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = _HF[family](layers)
        if lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            )  # fmt: skip
            self.model = get_peft_model(self.model, config)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**batch, use_cache=False).loss


class HFT5(Base):
    """Hugging Face T5 (encoder-decoder; the token embedding is shared by the encoder, the decoder and the head)."""

    def __init__(self, layers: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=HIDDEN, num_layers=layers, num_decoder_layers=layers,
            num_heads=4, dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1,
        )  # fmt: skip
        self.model = T5ForConditionalGeneration(config)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss  # fmt: skip


class LitGPT(Base):
    """litgpt's ``GPT`` (fused q/k/v grouped per query group; head counts read from its shared ``config``)."""

    def __init__(self, layers: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        from litgpt.config import Config
        from litgpt.model import GPT

        config = Config(
            n_layer=layers, n_head=4, n_query_groups=2, n_embd=WIDTH, block_size=CONTEXT, vocab_size=VOCAB,
            padded_vocab_size=VOCAB, intermediate_size=HIDDEN, bias=False, mlp_class_name="LLaMAMLP",
            norm_class_name="RMSNorm", rotary_percentage=1.0, parallel_residual=False,
        )  # fmt: skip
        self.gpt = GPT(config)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = self.gpt(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


class SwiGLU(nn.Module):
    """A SwiGLU MLP whose layers have no conventional names."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedGatedMLP(nn.Module):
    """A gated MLP with gate and up fused in one layer, split by ``chunk(2)`` (ModernBERT's ``Wi``)."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.Wi, self.Wo = nn.Linear(d, 2 * h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(F.gelu(gate) * up)


class MLPBlock(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(WIDTH), mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MLPStack(Base):
    """Embedding, blocks of ``mlp`` ("swiglu" or "fused_wi") with residuals, and an untied LM head."""

    def __init__(self, mlp: str = "swiglu", layers: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        make = {"swiglu": SwiGLU, "fused_wi": FusedGatedMLP}[mlp]
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(MLPBlock(make(WIDTH, HIDDEN)) for _ in range(layers))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


MODELS = {
    "hf_llama_lora": lambda **kw: HFFamilyLM("llama", lora=True, **kw),
    "hf_gemma": lambda **kw: HFFamilyLM("gemma", **kw),
    "hf_qwen3": lambda **kw: HFFamilyLM("qwen3", **kw),
    "hf_qwen2": lambda **kw: HFFamilyLM("qwen2", **kw),
    "hf_phi": lambda **kw: HFFamilyLM("phi", **kw),
    "hf_phi3": lambda **kw: HFFamilyLM("phi3", **kw),
    "hf_gpt_neox": lambda **kw: HFFamilyLM("gpt_neox", **kw),
    "hf_t5": HFT5,
    "litgpt": LitGPT,
    "swiglu_names": lambda **kw: MLPStack("swiglu", **kw),
    "fused_wi": lambda **kw: MLPStack("fused_wi", **kw),
}

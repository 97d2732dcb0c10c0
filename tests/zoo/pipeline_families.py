"""Models of the kinds issue 13 named, as their users write them: padded token-mean losses (plain and Hugging Face),
a model that registers its head before its blocks, ``nn.TransformerEncoder``, litgpt's ``GPT``, an encoder-decoder,
Qwen2 and Phi."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from tests.models import VOCAB, Base, HFCausalLM, TinyGPT
from tests.zoo.tp_families import HFFamilyLM

PAD = 0


class PaddedTokenData(Dataset):
    """Fixed-length rows of ``width`` tokens, each sample a different number of them real, the rest padding: labels
    -100 and attention 0 on the padding, so micro-batches hold very different numbers of real tokens."""

    def __init__(self, n: int, width: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            real = int(torch.randint(2, width + 1, (1,), generator=g))
            ids = torch.full((width,), PAD)
            ids[:real] = torch.randint(1, VOCAB, (real,), generator=g)
            self.items.append((ids, real))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, real = self.items[i]
        mask = (torch.arange(len(ids)) < real).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class PaddedGPT(TinyGPT):
    """Plain PyTorch causal-LM fine-tuning on padded batches: a token-mean ``F.cross_entropy`` that ignores padding."""

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)

    def logits(self, batch: dict) -> torch.Tensor:
        x, mask = self.embed(batch["input_ids"])
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))[:, :-1].reshape(-1, VOCAB)

    def forward(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


class PaddedHF(HFCausalLM):
    """A Hugging Face causal LM fine-tuned on padded batches through its own ``labels=`` loss."""

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)


class WeightedLossGPT(PaddedGPT):
    """``nn.CrossEntropyLoss`` with class weights (its mean divides by the targets' summed weights)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.register_buffer("class_weight", torch.linspace(0.5, 1.5, VOCAB))
        self.loss_fn = nn.CrossEntropyLoss(weight=self.class_weight, ignore_index=-100)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.logits(batch), batch["labels"][:, 1:].reshape(-1))


class TwoTermLossGPT(PaddedGPT):
    """A loss the normaliser cannot read as one mean (a second term): micro-batches keep the sample weighting."""

    def forward(self, batch: dict) -> torch.Tensor:
        return super().forward(batch) + 0.0 * self.wte.weight.sum()


class HeadFirstGPT(Base):
    """Registers its final norm and LM head before the blocks (as litgpt's ``GPT`` and Hugging Face OPT do)."""

    def __init__(self, d: int = 32, layers: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        from tests.models import Block

        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.ln_f = nn.LayerNorm(d)
        self.wte = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d, 2) for _ in range(layers))

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        t = ids.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


class TorchEncoderLM(Base):
    """``nn.TransformerEncoder`` (which inspects ``self.layers[0]`` before running them) as a masked LM."""

    def __init__(self, d: int = 32, layers: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        self.embed = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)

    def forward(self, batch: dict) -> torch.Tensor:
        pad = batch["attention_mask"] == 0
        x = self.encoder(self.embed(batch["input_ids"]), src_key_padding_mask=pad)
        return F.cross_entropy(self.head(x).reshape(-1, VOCAB), batch["labels"].reshape(-1))


class LitGPT(Base):
    """litgpt's ``GPT`` (head registered first, blocks read a shared config) fine-tuned on padded batches."""

    def __init__(self, layers: int = 4, **kw: Any) -> None:
        super().__init__(**kw)
        from litgpt import Config
        from litgpt.model import GPT

        config = Config(
            n_layer=layers, n_embd=32, n_head=4, n_query_groups=2, vocab_size=VOCAB, padded_vocab_size=VOCAB,
            block_size=16, bias=False,
        )  # fmt: skip
        self.model = GPT(config)

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


class HFSeq2Seq(Base):
    """A Hugging Face encoder-decoder (T5 or BART), tiny: every decoder block reads the encoder's output."""

    def __init__(self, family: str = "t5", layers: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        if family == "t5":
            from transformers import T5Config, T5ForConditionalGeneration

            config = T5Config(
                vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
            )  # fmt: skip
            self.model = T5ForConditionalGeneration(config)
        else:
            from transformers import BartConfig, BartForConditionalGeneration

            config = BartConfig(
                vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, decoder_start_token_id=2,
            )  # fmt: skip
            self.model = BartForConditionalGeneration(config)

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).loss


class PeftLlama(PaddedHF):
    """PEFT LoRA on a Hugging Face LLaMA (q_proj and v_proj adapted; only the adapters train)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(family="llama", **kw)
        from peft import LoraConfig, get_peft_model

        self.model = get_peft_model(self.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, param in self.model.named_parameters():  # non-zero adapters: the test sees their gradients flow
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


class PaddedFamily(HFFamilyLM):
    """A Hugging Face causal LM of another family (tp_families.py's tiny configs) fine-tuned on padded batches
    through its own ``labels=`` loss."""

    def dataset(self, seed: int) -> Dataset:
        return PaddedTokenData(self.n, seed=seed)


MODELS = {
    "padded_gpt": PaddedGPT,
    "padded_hf_qwen2": lambda **kw: PaddedFamily("qwen2", **kw),
    "padded_hf_phi": lambda **kw: PaddedFamily("phi", **kw),
    "padded_hf_llama": lambda **kw: PaddedHF(family="llama", **kw),
    "padded_hf_gpt2": lambda **kw: PaddedHF(family="gpt2", **kw),
    "weighted_loss_gpt": WeightedLossGPT,
    "two_term_loss_gpt": TwoTermLossGPT,
    "head_first_gpt": HeadFirstGPT,
    "torch_encoder": TorchEncoderLM,
    "litgpt_padded": LitGPT,
    "seq2seq_t5": lambda **kw: HFSeq2Seq(family="t5", **kw),
    "seq2seq_bart": lambda **kw: HFSeq2Seq(family="bart", **kw),
    "peft_llama": PeftLlama,
}


class LayerSumGPT(PaddedGPT):
    """Reads every block's output after the last block (a learned mix of layers, as ELMo-style heads do)."""

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        x, mask = self.embed(ids)
        outputs = []
        for block in self.blocks:
            x = block(x, mask)
            outputs.append(x)
        mixed = torch.stack(outputs).mean(0)
        logits = self.head(self.ln_f(mixed))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))


MODELS["layer_sum_gpt"] = LayerSumGPT

"""Train or fine-tune a causal language model (GPT-2 and LLaMA families), split across pipeline stages.

The offline default trains a small GPT-2, built from its config with a byte vocabulary, on the English
documentation that ships with Python; ``model=gpt2 data=wikitext`` fine-tunes the pretrained GPT-2 on WikiText-2.

    python examples/causal_lm.py                                  # pp=2 on 2 CPU processes (conf/causal_lm.yaml)
    python examples/causal_lm.py model=llama_tiny strategy/pipeline=gpipe
    python examples/causal_lm.py model=gpt2 data=wikitext         # online: from_pretrained + load_dataset
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.lm import CausalLanguageModel
from examples.nlp_data import ByteTokenizer, language_model_data
from examples.recipe import fit, loaders
from lightning_mp import build_strategy
from lightning_mp.integrations.config import one_line_errors


@hydra.main(config_path="../conf", config_name="causal_lm", version_base="1.3")
@one_line_errors  # a ConfigError or ModelSplitError: one line, exit status 1
def main(cfg: DictConfig) -> None:
    strategy = build_strategy(cfg.strategy)  # a bad setting fails here, before any process starts
    torch.set_num_threads(cfg.threads_per_rank)
    L.seed_everything(cfg.seed, verbose=False)
    m = cfg.model
    if m.tokenizer == "bytes":
        encode = ByteTokenizer().encode
    else:
        from transformers import AutoTokenizer

        encode = AutoTokenizer.from_pretrained(m.tokenizer or m.name_or_path).encode
    train, val = language_model_data(cfg.data, encode)
    config = OmegaConf.to_container(m.config) if m.config is not None else None
    model = CausalLanguageModel(m.name_or_path, config, m.lr, m.weight_decay, m.warmup_steps)
    fit(cfg, strategy, model, *loaders(cfg, train, val))


if __name__ == "__main__":
    main()

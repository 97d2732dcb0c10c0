"""Real English text available on every machine without a download: the documentation that ships inside Python's
standard library (module, class and function docstrings), as byte-level training windows."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch.utils.data import Dataset

STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "zipfile",
)


def python_docs_text(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The docstrings of ``modules`` and their public members, in a fixed order."""
    parts: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            member = getattr(module, attr)
            if attr.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(member)
            if doc:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p.strip())


class ByteWindows(Dataset):
    """Consecutive, non-overlapping windows of ``block_size + 1`` bytes of ``text`` (inputs and next-byte targets)."""

    def __init__(self, text: str, block_size: int) -> None:
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        n = (len(data) - 1) // block_size
        self.windows = data[: n * block_size + 1]
        self.block_size = block_size
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return self.windows[start : start + self.block_size + 1]


# Topic classification on the same offline text: which part of the standard library a docstring documents.
TOPICS: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "csv", "html.parser", "unicodedata"),
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers"),
    "network": ("socket", "http.client", "urllib.request", "urllib.parse", "email.message", "smtplib", "ipaddress"),
    "files": ("os", "pathlib", "shutil", "tarfile", "zipfile", "tempfile", "glob", "filecmp"),
    "concurrency": ("threading", "asyncio", "subprocess", "multiprocessing", "concurrent.futures", "queue", "sched"),
}


def python_topic_examples(topics: dict[str, tuple[str, ...]] = TOPICS) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label names): the first paragraph of each public docstring, labelled with its module's topic.

    Identical docstrings (inherited or shared between modules) are kept once, under the first topic that has them.
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, modules in enumerate(topics.values()):
        for name in modules:
            for doc in _docstrings(importlib.import_module(name)):
                paragraph = doc.split("\n\n")[0].strip()
                if len(paragraph) >= 20 and paragraph not in seen:
                    seen.add(paragraph)
                    texts.append(paragraph)
                    labels.append(label)
    return texts, labels, list(topics)


def _docstrings(module: object) -> list[str]:
    """The docstrings of a module, its public members defined in its package, and their public methods."""
    package = module.__name__.split(".")[0]  # type: ignore[attr-defined]
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        member = getattr(module, attr)
        if attr.startswith("_") or not str(getattr(member, "__module__", "")).startswith(package):
            continue
        docs.append(inspect.getdoc(member) or "")
        if inspect.isclass(member):
            docs += [inspect.getdoc(m) or "" for a, m in sorted(vars(member).items()) if not a.startswith("_")]
    return docs

"""Hugging Face models inside a LightningModule: found at save time, rebuilt from a checkpoint for ``from_pretrained``.

A checkpoint records, for each outermost ``transformers.PreTrainedModel`` in the module, its attribute path, class
and config. :func:`export_hugging_face` turns a lightning-mp checkpoint back into that model and writes a directory
that ``AutoModel...from_pretrained`` loads, without the user's LightningModule code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def hugging_face_models(module: nn.Module | None) -> list[dict[str, Any]]:
    """[{"prefix", "class", "config"}] for each outermost Hugging Face model in ``module``."""
    if module is None:
        return []
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    found: list[dict[str, Any]] = []
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(name.startswith(f["prefix"] + ".") for f in found):
            found.append({"prefix": name, "class": type(sub).__name__, "config": sub.config.to_dict()})
    return found


def export_hugging_face(checkpoint: dict[str, Any], out_dir: str | Path, index: int = 0) -> Path:
    """Write the ``index``-th Hugging Face model of a full checkpoint dict as a ``from_pretrained`` directory.

    Raises:
        ValueError: the checkpoint holds no Hugging Face model, or its weights do not fill the model.
    """
    import transformers

    models = checkpoint.get("lightning_mp", {}).get("hf_models", [])
    if index >= len(models):
        raise ValueError(
            f"the checkpoint records {len(models)} Hugging Face models; there is no model {index} to export."
        )
    info = models[index]
    cls = getattr(transformers, info["class"])
    config = cls.config_class.from_dict(info["config"])
    prefix = info["prefix"] + "." if info["prefix"] else ""
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if empty:
        raise ValueError(f"the checkpoint does not hold {len(empty)} weights of {info['class']}, e.g. {empty[:3]}.")
    out = Path(out_dir)
    model.save_pretrained(out)
    return out

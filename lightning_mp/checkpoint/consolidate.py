"""One process, one file: a lightning-mp checkpoint directory turned into what tools without lightning-mp read.

    python -m lightning_mp.consolidate CHECKPOINT_DIR model.ckpt            # one ordinary Lightning checkpoint file
    python -m lightning_mp.consolidate CHECKPOINT_DIR --hf hf_model/         # a from_pretrained directory

``consolidate`` does the same from Python, and ``DistributedCheckpointIO`` lets a plain one-process ``Trainer``
resume from the directory itself: ``L.Trainer(plugins=[DistributedCheckpointIO()]).fit(model, ckpt_path=dir)``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from lightning_mp.checkpoint.distributed import is_checkpoint_dir, load_full_checkpoint
from lightning_mp.checkpoint.hugging_face import export_hugging_face


def consolidate(
    checkpoint_dir: str | Path,
    out_file: str | Path | None = None,
    hf_dir: str | Path | None = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    """The whole checkpoint as one Lightning checkpoint dict; also written to ``out_file`` and/or, for a Hugging
    Face model inside the LightningModule, as a ``from_pretrained`` directory ``hf_dir``."""
    checkpoint = load_full_checkpoint(checkpoint_dir, weights_only=weights_only)
    if out_file is not None:
        out = Path(out_file)
        partial = out.with_name(out.name + ".partial")
        torch.save(checkpoint, partial)
        os.replace(partial, out)  # atomic: the file is whole or absent
    if hf_dir is not None:
        export_hugging_face(checkpoint, hf_dir)
    return checkpoint


class DistributedCheckpointIO(TorchCheckpointIO):
    """Lightning's file checkpoint IO that also reads lightning-mp checkpoint directories (in one process)."""

    def __init__(self, weights_only: bool = True) -> None:
        self.weights_only = weights_only

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_checkpoint_dir(path):
            return load_full_checkpoint(path, weights_only=self.weights_only if weights_only is None else weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_mp.consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a lightning-mp checkpoint directory")
    parser.add_argument("out", nargs="?", help="write one ordinary Lightning checkpoint file here")
    parser.add_argument("--hf", metavar="DIR", help="write the Hugging Face model as a from_pretrained directory")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow Python objects (runs their code)")
    args = parser.parse_args(argv)
    if args.out is None and args.hf is None:
        parser.error("give an output file, --hf DIR, or both")
    checkpoint = consolidate(args.checkpoint, args.out, args.hf, weights_only=not args.trust_checkpoint)
    tensors = len(checkpoint["state_dict"])
    print(f"{args.checkpoint}: {tensors} tensors" + "".join(f" -> {p}" for p in (args.out, args.hf) if p))


if __name__ == "__main__":
    main()

"""``python -m lightning_mp.consolidate``: the command-line entry of :mod:`lightning_mp.checkpoint.consolidate`."""

from lightning_mp.checkpoint.consolidate import DistributedCheckpointIO, consolidate, main

__all__ = ["DistributedCheckpointIO", "consolidate", "main"]

if __name__ == "__main__":
    main()

"""Lightning-mp in other tools: the Hydra structured config and sweep summary, the strategy registry of
``lightning.pytorch`` and ``pytorch_lightning``.

The top floor: may import everything, including :mod:`lightning_mp.strategy`."""

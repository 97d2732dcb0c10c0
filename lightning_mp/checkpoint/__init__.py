"""Checkpoints: each rank's stage written with DCP under the model's own names, optimizer state by name,
one-process consolidation and Hugging Face export.

May import ``runtime``, ``plan``, ``tensor`` and ``pipeline``."""

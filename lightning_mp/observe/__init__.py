"""Seeing what runs: step statistics, the stage monitor, the pipeline timeline, ``self.log`` capture and replay,
and the summary callback.

May import ``runtime`` and ``plan``."""

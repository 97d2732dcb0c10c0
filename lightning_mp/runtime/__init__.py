"""The processes: the parallel layout and its mesh, every process group, the launcher, point-to-point messages,
the failure watch, the errors, and the tree walker for nested batches.

Imports nothing else of lightning_mp: every other package may import it."""

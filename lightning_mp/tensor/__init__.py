"""Tensor parallelism: the plan (which module splits how), the sharding and Megatron's communication operators,
the parallel layers, sequence parallelism and the vocabulary-parallel loss.

May import ``runtime``."""

"""Every process group lightning-mp creates, in one documented order.

``torch.distributed`` needs every rank to create every group, in the same order. The order is:

1. the default group (``setup_environment``) and the (dp, pp, tp) ``DeviceMesh`` (:meth:`ParallelLayout.build_mesh`),
   whose dims give the pipeline, tensor-parallel and data-parallel groups;
2. :func:`replica_groups`: for each data-parallel replica, all its pp × tp ranks (the global gradient norm);
3. :func:`shared_weight_groups`: for each set of pipeline ranks sharing a parameter (a tied LM head), for each
   (dp, tp) coordinate, those ranks (the tied weights' gradient sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

from lightning_mp.runtime.layout import ParallelLayout


def replica_groups(layout: ParallelLayout, rank: int) -> dist.ProcessGroup | None:
    """The group of every stage and tp rank of ``rank``'s replica (None when that is one rank)."""
    mine = None
    for d in range(layout.dp):
        ranks = [layout.rank_of(d, s, t) for s in range(layout.pp) for t in range(layout.tp)]
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if d == layout.coords(rank)[0]:
            mine = group
    return mine


def shared_weight_groups(
    layout: ParallelLayout, rank: int, position_sets: Sequence[tuple[int, ...]]
) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """For each set of pipeline positions in ``position_sets``: the group of those positions at ``rank``'s (dp, tp)."""
    dp_rank, _, tp_rank = layout.coords(rank)
    groups = {}
    for positions in position_sets:
        for d in range(layout.dp):
            for t in range(layout.tp):
                group = dist.new_group([layout.rank_of(d, s, t) for s in positions])
                if (d, t) == (dp_rank, tp_rank):
                    groups[tuple(positions)] = group
    return groups

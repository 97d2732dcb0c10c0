"""The parallel layout: how many ranks split the data, the layers and the weights, as one validated object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch

from lightning_mp.runtime.errors import LayoutError

SizeSpec = Union[int, Literal["auto"]]


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the (dp, pp, tp) mesh. ``dp * pp * tp == world_size`` always holds.

    Ranks are laid out with tp innermost, then pp, then dp: global rank ``r`` sits at
    ``dp_rank = r // (pp * tp)``, ``pp_rank = (r // tp) % pp``, ``tp_rank = r % tp``.
    """

    dp: int
    pp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @classmethod
    def resolve(cls, world_size: int, dp: SizeSpec = "auto", pp: SizeSpec = "auto", tp: int = 1) -> ParallelLayout:
        """Fill in the "auto" sizes from the world size and check that the product matches.

        With both ``dp`` and ``pp`` on "auto", every rank joins the pipeline (dp = 1).

        Raises:
            LayoutError: a size is not a positive int or "auto", or the sizes do not multiply to the world size.
        """
        for name, value in (("data_parallel_size", dp), ("pipeline_parallel_size", pp), ("tensor_parallel_size", tp)):
            if value == "auto" and name != "tensor_parallel_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(
                    f"{name}={value!r} is invalid: use a positive int"
                    + ("" if name == "tensor_parallel_size" else ' or "auto"')
                )
        if dp == "auto" and pp == "auto":
            dp = 1
        if pp == "auto":
            pp = _quotient(world_size, int(dp) * tp, "pipeline_parallel_size", dp, "auto", tp)
        if dp == "auto":
            dp = _quotient(world_size, int(pp) * tp, "data_parallel_size", "auto", pp, tp)
        layout = cls(int(dp), int(pp), int(tp))
        if layout.world_size != world_size:
            raise LayoutError(
                f"data_parallel_size({dp}) × pipeline_parallel_size({pp}) × tensor_parallel_size({tp})"
                f" = {layout.world_size} ≠ world size {world_size} (devices × nodes). Change the sizes or set one"
                ' of them to "auto".'
            )
        return layout

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of a global rank."""
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """Global rank at the given mesh coordinates."""
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def build_mesh(self, device_type: str) -> torch.distributed.device_mesh.DeviceMesh:
        """The (dp, pp, tp) DeviceMesh over the initialized default process group."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.dp, self.pp, self.tp), mesh_dim_names=("dp", "pp", "tp"))

    def describe(self, rank: int) -> str:
        """A global rank as messages name it: "rank 3 (stage 1)", with the tp rank and replica when there are some."""
        dp, pp, tp = self.coords(rank)
        where = f"rank {rank} (stage {pp}" + (f", tp rank {tp}" if self.tp > 1 else "")
        return where + (f", replica {dp})" if self.dp > 1 else ")")

    def __str__(self) -> str:
        return f"dp={self.dp} × pp={self.pp} × tp={self.tp}"


def _quotient(world_size: int, divisor: int, name: str, dp: SizeSpec, pp: SizeSpec, tp: int) -> int:
    if world_size % divisor:
        given = " × ".join(
            f"{n}({v})"
            for n, v in (("data_parallel_size", dp), ("pipeline_parallel_size", pp), ("tensor_parallel_size", tp))
            if v != "auto"
        )
        raise LayoutError(
            f"cannot derive {name}: world size {world_size} (devices × nodes) is not divisible by {given} = {divisor}."
            f" Choose sizes whose product divides {world_size}, or change the number of devices."
        )
    return world_size // divisor


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> float:
    """Bytes from a number or a string such as "24GiB", "500 MB", "1.5e9".

    Raises:
        LayoutError: the string is not a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :] or "b"
    try:
        return float(number) * _UNITS[unit]
    except (KeyError, ValueError) as err:
        raise LayoutError(
            f"max_memory={value!r} is not a size: use bytes or a number with a unit, e.g. '24GiB' or '500MB'."
        ) from err

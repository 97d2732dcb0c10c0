"""This rank's process: joining the process group with a failure watch, reporting a failure, leaving cleanly."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device, _init_dist_connection
from torch.distributed.distributed_c10d import _get_default_store

from lightning_mp.runtime.launcher import hydra_multirun
from lightning_mp.runtime.watchdog import FailureWatch

START_TIMEOUT = default_pg_timeout  # the longest the ranks may take to all join the process group (30 min)


def join_process_group(
    cluster_environment: Any, device: torch.device, backend: str | None, timeout: timedelta | None, rank: int,
    describe: Callable[[int], str], on_abort: Callable[[], None] | None = None,
) -> tuple[str, FailureWatch, dist.ProcessGroup | None]:  # fmt: skip
    """Initialize the default process group (gloo on CPU, NCCL on GPU unless ``backend``) and start this rank's
    :class:`FailureWatch` (``on_abort`` runs before it ends this process).

    Start-up (every rank joining the store) is bounded by ``START_TIMEOUT``, not by ``timeout``: a short message
    timeout must not fail a job whose ranks are slow to start (imports on a loaded machine). With a ``timeout``
    shorter than that, point-to-point messages get a group of all ranks of their own, with ``timeout``.

    Returns:
        (the backend, the watch, the messages' group: None for the default group).
    """
    backend = backend or _get_default_process_group_backend_for_device(device)
    timeout = timeout or default_pg_timeout
    _init_dist_connection(cluster_environment, backend, timeout=max(timeout, START_TIMEOUT))
    messages = dist.new_group(timeout=timeout) if timeout < START_TIMEOUT else None
    # gloo raises at the group's timeout itself (with the P2P label); the watch is the backstop (NCCL)
    watch = FailureWatch(_get_default_store(), rank, describe, timeout.total_seconds() + 5.0, on_abort=on_abort)
    watch.start()
    return backend, watch, messages


def report_failure(exception: BaseException, watch: FailureWatch | None, me: str) -> None:
    """Name this rank in its own traceback and tell the other ranks (they end within seconds instead of waiting
    in a receive)."""
    if not dist.is_initialized():
        return
    exception.add_note(f"lightning-mp: raised on {me}")
    if watch is not None and not isinstance(exception, KeyboardInterrupt):
        summary = f"{type(exception).__name__}: {exception}".splitlines()[0][:500]
        watch.report(f"{me} failed: {summary}")


def leave_process_group(watch: FailureWatch | None, world_size: int, failed: bool, launcher: Any) -> None:
    """Stop the watch (global rank 0 waits, bounded, for every rank's); in a Hydra multirun, end the process group
    and the launch environment, since the next job starts its own."""
    if watch is not None:
        watch.stop(world_size, failed=failed)
    if hydra_multirun():
        if dist.is_initialized():
            dist.destroy_process_group()
        restore = getattr(launcher, "restore_environment", None)  # HydraJobLauncher, of either Lightning package
        if restore is not None:
            restore()

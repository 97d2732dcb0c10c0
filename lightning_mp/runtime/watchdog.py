"""Failing fast across ranks: when one rank fails, every rank stops within seconds and says which rank failed and why.

A pipeline stage spends much of its step blocked in a receive from its neighbour. If that neighbour raised, was
killed, or hangs, the receive returns only when the transport notices (gloo: at once for a closed connection;
NCCL: at the process-group timeout, 30 minutes by default). ``FailureWatch`` is a daemon thread per rank that uses
the rendezvous store every rank already shares:

- a rank whose step raises posts "rank r (stage s) failed: <error>" under one key (the first failure wins);
  every other rank's watch sees it within ``poll`` seconds, prints it and exits with status 1;
- each watch bumps a heartbeat counter; a rank blocked on a peer whose heartbeat has stopped for ``dead_after``
  seconds (the peer's process is gone, e.g. SIGKILL) ends with a message naming the peer;
- a point-to-point wait longer than ``timeout`` ends the rank with a message naming the rank, stage, micro-batch,
  direction and peer, and posts it so that the others end too.

On NCCL a receive returns at once and the real wait happens on the device, later: there the messenger hands each
posted operation to :meth:`FailureWatch.track`, and the thread judges the oldest one not yet completed (asked with
``Work.is_completed()``, which does not block) as it judges a blocking wait, so a dead or hung peer is named there
too, with no host synchronisation added to the step.

Liveness is judged only while this rank is blocked on a peer, so a peer that finished its last step early is never
taken for dead. At the end, global rank 0 (whose process hosts the store) waits a bounded time for every watch to
stop before it returns: a watch thread caught in a store call when the store's host exits would block the rank's
exit until the store's timeout.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

FAILURE_KEY = "lightning_mp/failure"
HEARTBEAT_KEY = "lightning_mp/heartbeat/{rank}"
STOPPED_KEY = "lightning_mp/stopped/{generation}"  # watches of one run that have stopped
STOP_WAIT_S = 30.0  # the longest rank 0 waits for the others' watches to stop


class FailureWatch:
    """Watches for other ranks' failures and for this rank's stuck point-to-point waits.

    Args:
        store: the rendezvous store shared by all ranks (``torch.distributed`` ``Store``).
        rank: this process's global rank.
        describe: names a global rank for messages, e.g. ``"rank 1 (stage 1)"``.
        timeout: seconds a point-to-point wait may last.
        poll: seconds between two looks at the store.
        dead_after: seconds without a heartbeat after which a peer this rank waits on is taken for dead.
        on_abort: runs before the watch ends this process (e.g. the launching rank ends the ranks it started, which
            would otherwise outlive it).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        describe: Callable[[int], str],
        timeout: float,
        poll: float = 1.0,
        dead_after: float = 10.0,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.rank = rank
        self.describe = describe
        self.timeout = timeout
        self.poll = poll
        self.dead_after = dead_after
        self.on_abort = on_abort
        self._waiting: tuple[int, str, float] | None = None  # (peer, what, since)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats: dict[int, tuple[int, float]] = {}  # peer -> (last counter seen, when it last changed)
        self._tracked: list[tuple[Any, int, str, float]] = []  # posted operations: (work, peer, what, since)
        self._lock = threading.Lock()

    _generations = 0  # watches started by this process: the same sequence on every rank

    def start(self) -> None:
        FailureWatch._generations += 1
        self.generation = FailureWatch._generations
        self._thread = threading.Thread(target=self._run, name="lightning-mp-failure-watch", daemon=True)
        self._thread.start()

    def stop(self, world_size: int = 1, failed: bool = False) -> None:
        """Stop the thread. Unless this run ``failed``, global rank 0 then waits (at most ``STOP_WAIT_S``) until the
        ``world_size`` ranks' watches have all stopped, so that no watch is left using the store it hosts."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=5 * self.poll)
        self._thread = None
        key = STOPPED_KEY.format(generation=self.generation)
        with contextlib.suppress(Exception):
            stopped = int(self.store.add(key, 1))
            deadline = time.monotonic() + STOP_WAIT_S
            while self.rank == 0 and not failed and stopped < world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                stopped = int(self.store.add(key, 0))

    @contextlib.contextmanager
    def waiting(self, peer: int, what: str) -> Iterator[None]:
        """Mark this rank as blocked on ``peer`` for ``what`` (e.g. "receive the activation of micro-batch 3")."""
        self._waiting = (peer, what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    def track(self, work: Any, peer: int, what: str) -> None:
        """Watch a posted point-to-point operation with ``peer`` until ``work.is_completed()`` (asynchronous
        transports, whose wait is not a host call)."""
        with self._lock:
            self._tracked.append((work, peer, what, time.monotonic()))

    def oldest_pending(self) -> tuple[int, str, float] | None:
        """(peer, what, since) of the oldest tracked operation not completed; completed ones are dropped."""
        with self._lock:
            tracked, self._tracked = self._tracked, []
        pending = [t for t in tracked if not _completed(t[0])]
        with self._lock:
            self._tracked = pending + self._tracked
        if not pending:
            return None
        _, peer, what, since = min(pending, key=lambda t: t[3])
        return peer, what, since

    def report(self, message: str) -> None:
        """Post this rank's failure for the others (kept only if no rank failed before)."""
        with contextlib.suppress(Exception):
            self.store.compare_set(FAILURE_KEY, "", message)

    def failure(self) -> str | None:
        """The first failure any rank posted, or None."""
        try:
            if self.store.check([FAILURE_KEY]):
                return self.store.get(FAILURE_KEY).decode()
        except Exception:  # the store is gone with rank 0: nothing to read
            return None
        return None

    # the thread ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        key = HEARTBEAT_KEY.format(rank=self.rank)
        while not self._stop.wait(self.poll):
            try:
                self.store.add(key, 1)
                posted = self.failure()
                if posted is not None and not posted.startswith(f"rank {self.rank} "):
                    self._abort(f"stopping because {posted}")
            except Exception:  # the store is unreachable (rank 0 ended): judge by the wait below
                pass
            self._check_wait()

    def _check_wait(self) -> None:
        for waiting in (self._waiting, self.oldest_pending() if self._tracked else None):
            if waiting is not None:
                self._judge(*waiting)

    def _judge(self, peer: int, what: str, since: float) -> None:
        """End this rank if its wait on ``peer`` since ``since`` is past the timeout or the peer is dead."""
        waited = time.monotonic() - since
        me = self.describe(self.rank)
        where = "to" if what.startswith("send") else "from"
        if waited > self.timeout:
            message = (
                f"{me} waited {waited:.0f} s to {what} {where} {self.describe(peer)} (timeout={self.timeout:.0f} s):"
                " that rank is stuck or much slower; raise ModelParallel(timeout=...) if its step legitimately"
                " takes this long."
            )
            self.report(f"{me} failed: {message}")
            self._abort(message)
        if waited > self.dead_after and not self._alive(peer):
            message = (
                f"{me} is waiting to {what} {where} {self.describe(peer)}, whose process has stopped responding for"
                f" {self.dead_after:.0f} s (killed, out of memory, or its machine is gone)."
            )
            self.report(f"{me} failed: {message}")
            self._abort(message)

    def _alive(self, peer: int) -> bool:
        now = time.monotonic()
        try:
            count = int(self.store.add(HEARTBEAT_KEY.format(rank=peer), 0))
        except Exception:  # no store: rank 0 hosted it and is gone; a peer other than 0 cannot be judged
            return peer != 0
        last = self._beats.get(peer)
        if last is None or last[0] != count:
            self._beats[peer] = (count, now)
            return True
        return now - last[1] < self.dead_after

    def _abort(self, message: str) -> None:
        sys.stderr.write(f"[rank{self.rank}] lightning-mp: {message}\n")
        sys.stderr.flush()
        if self.on_abort is not None:
            with contextlib.suppress(Exception):
                self.on_abort()
        os._exit(1)


def _completed(work: Any) -> bool:
    """Whether a posted operation has completed (one that cannot say, e.g. aborted, counts as completed)."""
    try:
        return bool(work.is_completed())
    except Exception:
        return True

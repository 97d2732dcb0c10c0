"""Lock-step runs: several benchmark workers started together, taking turns one training step at a time.

Why: on a shared machine the speed drifts by ±10–15% within minutes, so two configurations timed in separate runs
minutes apart can differ by as much as what is being measured. Here every worker waits for its turn before each
step and says when all its ranks have finished it; the orchestrator grants the turns round by round, the first
mover rotating, so that the workers' n-th steps run within seconds of each other and a drift hits them alike. A
waiting worker blocks on a pipe read and takes no CPU; only one worker computes at a time.

Worker side: :class:`Turn` (``Turn.from_env(rank)`` is None outside a lock-step run). Orchestrator side:
:func:`run_in_lock_step`.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ENV = "LMP_BENCH_TURNS"  # "<directory>:<side>" in a lock-step worker's environment
TIMEOUT_S = 900.0  # a turn that takes longer means a worker or the orchestrator is gone


class Turn:
    """A lock-step worker rank: :meth:`begin` before a step blocks until the orchestrator grants it, :meth:`end`
    after it reports it done. After its last step a worker calls :meth:`begin` once more: the orchestrator releases
    every worker together once all have run, so that no worker's exit overlaps another's timed step."""

    def __init__(self, directory: Path, side: str, rank: int) -> None:
        self._go = os.open(directory / f"{side}.go.{rank}", os.O_RDWR)
        self._done = os.open(directory / f"{side}.done", os.O_RDWR)

    @classmethod
    def from_env(cls, rank: int) -> Turn | None:
        value = os.environ.get(ENV)
        if not value:
            return None
        directory, _, side = value.rpartition(":")
        return cls(Path(directory), side, rank)

    def begin(self) -> None:
        ready, _, _ = select.select([self._go], [], [], TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"no turn granted in {TIMEOUT_S:.0f} s: the lock-step orchestrator is gone")
        os.read(self._go, 1)

    def end(self) -> None:
        os.write(self._done, b".")


@dataclass
class Side:
    """One worker of a lock-step run: ``argv`` is started once per entry of ``rank_envs`` (each with those extra
    variables); ``ranks`` of its processes take turns (a Lightning worker starts one process that launches the
    others, which inherit the lock-step variable)."""

    name: str
    argv: list[str]
    ranks: int
    rank_envs: list[dict[str, str]] = field(default_factory=lambda: [{}])


def run_in_lock_step(sides: list[Side], steps: int, env: dict[str, str], cwd: Path) -> dict[str, list[float]]:
    """Start every side, run ``steps`` rounds in which each side runs one step (the first mover rotating), then
    release them all; return each side's step times, from the grant to its last rank's report.

    Raises:
        RuntimeError: a side's process exited before its last step, or failed (its error output attached).
    """
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as opened:
        directory = Path(tmp)

        def fifo(name: str) -> int:
            os.mkfifo(directory / name)
            fd = os.open(directory / name, os.O_RDWR)
            opened.callback(os.close, fd)
            return fd

        pipes = {s.name: ([fifo(f"{s.name}.go.{r}") for r in range(s.ranks)], fifo(f"{s.name}.done")) for s in sides}
        processes = {
            side.name: [
                subprocess.Popen(
                    side.argv,
                    env={**env, **extra, ENV: f"{directory}:{side.name}"},
                    cwd=cwd,
                    stdout=subprocess.DEVNULL,
                    # a file, not a pipe: a pipe nobody reads could fill and block the worker
                    stderr=opened.enter_context((directory / f"{side.name}.{i}.err").open("w")),
                )
                for i, extra in enumerate(side.rank_envs)
            ]
            for side in sides
        }
        times: dict[str, list[float]] = {side.name: [] for side in sides}
        try:
            for step in range(steps + 1):  # the last round releases the workers
                order = sides[step % len(sides) :] + sides[: step % len(sides)]
                for side in order:
                    go, done = pipes[side.name]
                    start = time.perf_counter()
                    for fd in go:
                        os.write(fd, b".")
                    if step == steps:
                        continue
                    _wait_for(done, side.ranks, processes[side.name], lambda n=side.name: _errors(directory, n))
                    times[side.name].append(time.perf_counter() - start)
            for name, procs in processes.items():
                for proc in procs:
                    if proc.wait(timeout=TIMEOUT_S):
                        raise RuntimeError(f"lock-step worker {name} failed:\n{_errors(directory, name)}")
        finally:
            for procs in processes.values():
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
        return times


def _wait_for(done: int, count: int, procs: list[subprocess.Popen], errors: Callable[[], str]) -> None:
    """Read ``count`` reports from ``done``, checking every second that the side's processes still run."""
    waited = 0.0
    while count:
        ready, _, _ = select.select([done], [], [], 1.0)
        if ready:
            count -= len(os.read(done, count))
            continue
        waited += 1.0
        if any(p.poll() is not None for p in procs) or waited > TIMEOUT_S:
            raise RuntimeError(f"a lock-step worker stopped before its turn ended:\n{errors()}")


def _errors(directory: Path, side: str) -> str:
    """The end of a side's error output."""
    return "\n".join(path.read_text()[-3000:] for path in sorted(directory.glob(f"{side}.*.err")))

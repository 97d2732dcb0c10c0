"""Time bounds that exclude process start-up: how long a multi-process run took after all its ranks had joined.

Starting the ranks (importing torch and Lightning, the rendezvous) takes seconds on an idle machine and can take a
minute on a loaded one, so a test's time bound must not include it. :func:`run_harness_timed` runs the harness like
:func:`tests.conftest.run_harness`, watching its output for Lightning's line printed once every rank has joined.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.conftest import JOB_ENV_LEFT_OUT, ROOT

STARTED = "All distributed processes registered"  # Lightning, on rank 0, once every rank joined
ORPHAN_WAIT_S = 20.0  # how long the ranks a run started may outlive it before they are killed


@dataclass
class TimedRun:
    """A finished run: exit status, output, and seconds from the end of start-up (or from launch) to the exit."""

    returncode: int
    stdout: str
    stderr: str
    after_start_s: float
    started: bool  # the ranks all joined (False: the run ended before any process group existed)
    leftover: bool  # a process of the run outlived its timeout, or the launching rank by ORPHAN_WAIT_S


def run_harness_timed(jobs: list[dict[str, Any]], out_dir: Path, timeout: float = 600) -> TimedRun:
    """Run ``jobs`` through tests/harness.py; time the run from the moment all its ranks have joined."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    return run_timed([str(ROOT / "tests" / "harness.py"), str(spec), str(out_dir)], timeout)


def run_timed(argv: list[str], timeout: float = 600) -> TimedRun:
    """Run a Python script as :func:`tests.conftest.run_script` does, noting when its ranks had all joined."""
    launched = time.monotonic()
    started: list[float] = []
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV_LEFT_OUT}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")  # as tests.conftest.run_script
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its ranks too can be ended together
    )  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=_read, args=(proc.stdout, out, started), daemon=True),
        threading.Thread(target=_read, args=(proc.stderr, err, started), daemon=True),
    ]
    for reader in readers:
        reader.start()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    ended = time.monotonic()
    for reader in readers:  # ranks still holding the output open outlived the launching one
        reader.join(timeout=ORPHAN_WAIT_S)
    leftover = proc.poll() is None or any(reader.is_alive() for reader in readers)
    if leftover:  # the session is still there: end what is left of it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for reader in readers:
        reader.join()
    after = ended - min(started, default=launched)
    return TimedRun(proc.returncode, "".join(out), "".join(err), after, bool(started), leftover)


def _read(stream: IO[str] | None, lines: list[str], started: list[float]) -> None:
    assert stream is not None
    for line in stream:
        if STARTED in line:
            started.append(time.monotonic())
        lines.append(line)

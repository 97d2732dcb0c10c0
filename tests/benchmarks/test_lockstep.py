"""Lock-step benchmark runs: workers take turns one step at a time and never overlap; a failing worker is an error
that carries its output, not a hang."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks.lockstep import Side, run_in_lock_step

ROOT = Path(__file__).resolve().parents[2]
WORKER = """
import os, sys, time
from benchmarks.lockstep import Turn
log, side, steps, fail = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
rank = int(os.environ["RANK"])
turn = Turn.from_env(rank)
for step in range(steps):
    turn.begin()
    if fail:
        raise SystemExit("worker broke on purpose")
    with open(log, "a") as f:
        f.write(f"{time.monotonic()} {side} {step} begin\\n")
    time.sleep(0.02)
    with open(log, "a") as f:
        f.write(f"{time.monotonic()} {side} {step} end\\n")
    turn.end()
turn.begin()  # the release
"""


def _sides(log: Path, steps: int, fail: str = "") -> list[Side]:
    def side(name: str, ranks: int) -> Side:
        argv = [sys.executable, "-c", WORKER, str(log), name, str(steps), "1" if name == fail else "0"]
        return Side(name, argv, ranks, [{"RANK": str(r)} for r in range(ranks)])

    return [side("a", 1), side("b", 2)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sides_take_turns_without_overlap(tmp_path: Path) -> None:
    log = tmp_path / "log"
    times = run_in_lock_step(_sides(log, 3), 3, _env(), ROOT)
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    events = sorted(
        (float(t), side, int(step), what) for t, side, step, what in map(str.split, log.read_text().split("\n")[:-1])
    )
    inside = {"a": 0, "b": 0}
    for _, side, _, what in events:  # only one side's ranks are inside a step at any time
        inside[side] += 1 if what == "begin" else -1
        assert min(inside.values()) == 0, events
    firsts = [next(s for _, s, step, what in events if step == k and what == "begin") for k in range(3)]
    assert firsts == ["a", "b", "a"]  # the first mover rotates


def test_a_failing_worker_is_an_error_with_its_output(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="worker broke on purpose"):
        run_in_lock_step(_sides(tmp_path / "log", 2, fail="b"), 2, _env(), ROOT)

"""Schedules as data: every micro-batch forwarded and back-propagated once per stage, in order, without deadlock."""

from __future__ import annotations

import pytest

from lightning_mp.schedules import Action, build_schedule, one_f_one_b


def simulate(name: str, stages: int, microbatches: int) -> None:
    """Run all stages' action lists against blocking receives; fail if no stage can make progress."""
    plans = [build_schedule(name, s, stages, microbatches) for s in range(stages)]
    done_f = [set() for _ in range(stages)]
    done_b = [set() for _ in range(stages)]
    pos = [0] * stages
    while any(pos[s] < len(plans[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(plans[s]):
                continue
            a = plans[s][pos[s]]
            if a.kind == "F":
                ready = s == 0 or a.microbatch in done_f[s - 1]
            else:
                ready = a.microbatch in done_f[s] and (s == stages - 1 or a.microbatch in done_b[s + 1])
            if ready:
                (done_f if a.kind == "F" else done_b)[s].add(a.microbatch)
                pos[s] += 1
                progressed = True
        assert progressed, f"{name} deadlocks at p={stages}, m={microbatches}: positions {pos}"


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "none"])
@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (2, 1), (2, 4), (4, 2), (4, 8), (3, 7)])
def test_schedule_completes(name: str, stages: int, microbatches: int) -> None:
    for s in range(stages):
        actions = build_schedule(name, s, stages, microbatches)
        assert sorted(a.microbatch for a in actions if a.kind == "F") == list(range(microbatches))
        assert [a.microbatch for a in actions if a.kind == "B"] == list(range(microbatches))
    simulate(name, stages, microbatches)


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 8), (4, 8), (4, 3)])
def test_1f1b_keeps_at_most_stages_minus_rank_in_flight(stages: int, microbatches: int) -> None:
    for s in range(stages):
        in_flight = peak = 0
        for a in one_f_one_b(s, stages, microbatches):
            in_flight += 1 if a.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak <= min(stages - s, microbatches)


def test_1f1b_order() -> None:
    assert one_f_one_b(0, 2, 3) == [
        Action("F", 0),
        Action("F", 1),
        Action("B", 0),
        Action("F", 2),
        Action("B", 1),
        Action("B", 2),
    ]


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="schedule='zb' is not supported"):
        build_schedule("zb", 0, 2, 2)

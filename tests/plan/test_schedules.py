"""Schedules as data: every micro-batch forwarded and back-propagated once per stage, in order, without deadlock."""

from __future__ import annotations

import pytest

from lightning_mp.observe.timeline import ideal_bubble
from lightning_mp.plan.schedules import (
    Action,
    build_schedule,
    forward_only,
    interleaved_1f1b,
    one_f_one_b,
    simulate,
    stage_ranks,
)


def check_completes(name: str, stages: int, microbatches: int, chunks: int = 1) -> None:
    """Run all ranks' action lists against blocking receives; fail if they would deadlock."""
    plans = [build_schedule(name, s, stages, microbatches, chunks) for s in range(stages)]
    assert simulate(plans, stages * chunks), f"{name} deadlocks at p={stages}, m={microbatches}, v={chunks}"


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "none"])
@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (2, 1), (2, 4), (4, 2), (4, 8), (3, 7)])
def test_schedule_completes(name: str, stages: int, microbatches: int) -> None:
    for s in range(stages):
        actions = build_schedule(name, s, stages, microbatches)
        assert sorted(a.microbatch for a in actions if a.kind == "F") == list(range(microbatches))
        assert [a.microbatch for a in actions if a.kind == "B"] == list(range(microbatches))
    check_completes(name, stages, microbatches)


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


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 5, 7, 8, 12])
def test_interleaved_completes_for_any_microbatch_count(stages: int, microbatches: int, chunks: int) -> None:
    check_completes("interleaved_1f1b", stages, microbatches, chunks)
    for r in range(stages):
        actions = build_schedule("interleaved_1f1b", r, stages, microbatches, chunks)
        mine = [r + j * stages for j in range(chunks)]
        for kind in "FB":  # every micro-batch once per own virtual stage, in micro-batch order per stage
            for k in mine:
                assert [a.microbatch for a in actions if a.kind == kind and a.stage == k] == list(range(microbatches))
        evaluation = forward_only(r, stages, microbatches, chunks)
        assert sorted((a.stage, a.microbatch) for a in evaluation) == [
            (k, i) for k in mine for i in range(microbatches)
        ]


def test_interleaved_order_is_megatrons_when_stages_divide_the_microbatches() -> None:
    # p = 2, v = 2, m = 4: rank 0 warms up with (p - 1) * 2 + (v - 1) * p = 4 forwards, rank 1 with 2
    f, b = (lambda i, k: Action("F", i, k)), (lambda i, k: Action("B", i, k))
    assert interleaved_1f1b(1, 2, 4, 2)[:6] == [f(0, 1), f(1, 1), f(0, 3), b(0, 3), f(1, 3), b(1, 3)]
    assert interleaved_1f1b(0, 2, 4, 2)[:6] == [f(0, 0), f(1, 0), f(0, 2), f(1, 2), f(2, 0), b(0, 2)]


def test_interleaving_shrinks_the_ideal_bubble() -> None:
    assert ideal_bubble("interleaved_1f1b", 4, 8, chunks=2) == pytest.approx(3 / 19)
    assert ideal_bubble("interleaved_1f1b", 4, 8, chunks=2) < ideal_bubble("1f1b", 4, 8)
    # interleaved zero bubble: below both interleaved 1F1B (the same order) and one stage per rank's zero bubble
    for p, m in [(2, 4), (4, 8)]:
        zb2 = ideal_bubble("zero_bubble", p, m, chunks=2)
        assert 0 < zb2 < ideal_bubble("interleaved_1f1b", p, m, chunks=2)
        assert zb2 < ideal_bubble("1f1b", p, m)


@pytest.mark.parametrize(("p", "m"), [(2, 3), (2, 8), (4, 4), (3, 7)])
def test_interleaved_zero_bubble_runs_interleaved_1f1b_order(p: int, m: int) -> None:
    for r in range(p):
        assert build_schedule("zero_bubble", r, p, m, 2) == build_schedule("interleaved_1f1b", r, p, m, 2)
    assert build_schedule("zero_bubble", 0, p, m) == build_schedule("1f1b", 0, p, m)  # one stage per rank: ZB-H1


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 5, 8])
def test_v_schedule_completes_and_keeps_1f1b_memory(stages: int, microbatches: int) -> None:
    check_completes("zero_bubble_v", stages, microbatches, 2)
    placement = stage_ranks("zero_bubble_v", stages, 2)
    assert placement[0] == placement[-1] == 0  # the first and the last stage on rank 0
    for r in range(stages):
        actions = build_schedule("zero_bubble_v", r, stages, microbatches)
        mine = [k for k, rank in enumerate(placement) if rank == r]
        for kind in "FB":
            for k in mine:
                assert [a.microbatch for a in actions if a.kind == kind and a.stage == k] == list(range(microbatches))
        held = peak = 0
        for a in actions:
            held += 1 if a.kind == "F" else -1
            peak = max(peak, held)
        assert peak <= 2 * stages  # stage-micro-batches of half a rank's layers: 1F1B's p micro-batches at most
        check = [forward_only(x, stages, microbatches, 2, "zero_bubble_v") for x in range(stages)]
        assert simulate(check, 2 * stages)


def test_v_shape_has_the_smallest_ideal_bubble() -> None:
    bubbles = [ideal_bubble(s, 2, 8, chunks=2) for s in ("zero_bubble_v", "zero_bubble", "interleaved_1f1b", "1f1b")]
    assert bubbles == sorted(bubbles)

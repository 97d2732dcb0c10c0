"""Deadlock freedom when sends block (NCCL's point-to-point is a rendezvous): the messages each schedule makes, posted
as the executor posts them (one stage per rank: an action's receive batched with the previous action's sends;
several: the tick-by-tick exchanges), complete for p ≤ 8 and m ≤ 32, in a steady step (no headers) and in a step
with new shapes (headers, read before the tensors)."""

from __future__ import annotations

import pytest

from lightning_mp.plan.schedules import build_schedule, simulate, stage_ranks, tick_plan

UNKEYED = ["gpipe", "1f1b", "zero_bubble"]


def _orders(name: str, p: int, m: int, v: int = 1) -> list:
    return [build_schedule(name, r, p, m, v) for r in range(p)]


@pytest.mark.parametrize("name", UNKEYED)
def test_every_unkeyed_schedule_completes_with_blocking_sends(name: str) -> None:
    for p in range(2, 9):
        for m in range(1, 33):
            orders = _orders(name, p, m)
            for headers in (False, True):
                assert simulate(orders, p, blocking=True, headers=headers), (name, p, m, headers)


def test_the_old_one_message_at_a_time_order_deadlocks_1f1b() -> None:
    """What the model catches: stage 0 sends a1 then receives g0, stage 1 sends g0 then receives a1."""
    orders = _orders("1f1b", 2, 2)
    assert simulate(orders, 2)  # buffered sends (gloo): fine
    assert not simulate(orders, 2, blocking=True, batched=False)
    assert simulate(orders, 2, blocking=True)


@pytest.mark.parametrize(("name", "v"), [("interleaved_1f1b", 2), ("interleaved_1f1b", 3), ("zero_bubble_v", 2)])
def test_schedules_with_several_stages_per_rank_complete_with_blocking_sends(name: str, v: int) -> None:
    """Their messages go tick by tick (exchange_plan), training and forward-only."""
    for p in range(2, 9):
        for m in range(1, 33) if v == 2 else (1, p - 1, p, p + 1, 2 * p + 1, 32):
            ranks = stage_ranks(name, p, v)
            for training in (True, False):
                orders = [tick_plan(name, r, p, m, v, training).actions for r in range(p)]
                for headers in (False, True):
                    assert simulate(orders, len(ranks), blocking=True, ranks=ranks, headers=headers), (p, m, headers)


def test_an_exchange_meets_its_peer_at_the_same_tick() -> None:
    """Every operation of a rank's tick-t exchange is in its peer's tick-t exchange, and a message is received in an
    exchange posted before the action that needs it."""
    p, m, v = 3, 5, 2
    ranks = stage_ranks("interleaved_1f1b", p, v)
    plans = [tick_plan("interleaved_1f1b", r, p, m, v, True) for r in range(p)]
    for r, plan in enumerate(plans):
        for ex in plan.exchanges:
            for dst, msg in ex.sends:
                peer = next(e for e in plans[dst].exchanges if e.tick == ex.tick)
                assert (r, msg) in peer.recvs
        received = {msg: ex.tick for ex in plan.exchanges for _, msg in ex.recvs}
        for action, tick in zip(plan.actions, plan.ticks):
            msg = (action.kind, action.stage, action.microbatch)
            source = action.stage - 1 if action.kind == "F" else action.stage + 1
            if 0 <= source < len(ranks) and ranks[source] != r:
                assert received[msg] < tick, (r, action)

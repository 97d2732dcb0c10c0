"""Deadlock freedom when sends block (NCCL's point-to-point is a rendezvous): the messages each schedule makes, posted
as the executor posts them (an action's receive batched with the previous action's sends), complete for p ≤ 8 and
m ≤ 32, in a steady step (no headers) and in a step with new shapes (headers, read before the tensors)."""

from __future__ import annotations

import pytest

from lightning_mp.plan.schedules import build_schedule, simulate, stage_ranks

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


@pytest.mark.xfail(
    strict=True,
    reason="keyed messages (interleaved, V) are read in the sender's order as they are"
    " needed: with blocking sends a sender can block on a message its peer reads late;"
    " the fix (post each boundary's next receives ahead, Megatron's send_forward_recv_forward) is open",
)
@pytest.mark.parametrize(("name", "v"), [("interleaved_1f1b", 2), ("zero_bubble_v", 2)])
def test_keyed_schedules_complete_with_blocking_sends(name: str, v: int) -> None:
    orders = _orders(name, 2, 4, v)
    assert simulate(orders, 2 * v, blocking=True, ranks=stage_ranks(name, 2, v))

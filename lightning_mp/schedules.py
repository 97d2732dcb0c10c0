"""Pipeline schedules as data: the ordered forward/backward actions each stage runs in one step.

A schedule is a pure function of (stage, number of stages, number of micro-batches); the executor turns its actions
into computation and point-to-point messages. Sends are posted asynchronously and each rank blocks only on the
receive its next action needs, so any order below in which every stage runs the forwards in micro-batch order and the
backwards in micro-batch order is free of deadlock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

ScheduleName = Literal["auto", "gpipe", "1f1b", "zero_bubble", "none"]
# "auto" is resolved to one of the others when the model is known (planning.choose_schedule)
SCHEDULE_CHOICES: tuple[str, ...] = ("auto", "gpipe", "1f1b", "zero_bubble", "none")


class Action(NamedTuple):
    """One unit of work: ``kind`` is "F" (forward) or "B" (backward) of micro-batch ``microbatch``."""

    kind: str
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def gpipe(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """Fill-drain: all forwards, then all backwards. Holds the activations of every micro-batch."""
    return [Action("F", i) for i in range(num_microbatches)] + [Action("B", i) for i in range(num_microbatches)]


def one_f_one_b(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """1F1B: after a warm-up of ``num_stages - stage - 1`` forwards, alternate one forward and one backward.

    Same bubble as GPipe, but a stage holds the activations of at most ``num_stages - stage`` micro-batches.
    """
    warmup = min(num_stages - stage - 1, num_microbatches)
    actions = [Action("F", i) for i in range(warmup)]
    next_backward = 0
    for i in range(warmup, num_microbatches):
        actions.append(Action("F", i))
        actions.append(Action("B", next_backward))
        next_backward += 1
    actions.extend(Action("B", i) for i in range(next_backward, num_microbatches))
    return actions


def forward_only(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """Evaluation: forwards only."""
    return [Action("F", i) for i in range(num_microbatches)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Action]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    # zero_bubble runs 1F1B's order; each backward computes input gradients only, and the deferred weight
    # gradients fill the waits (weight_grads.py, executor.py)
    "zero_bubble": one_f_one_b,
    # "none" is naive model parallelism: the whole batch as one micro-batch, one stage at a time.
    "none": gpipe,
}


def build_schedule(name: str, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """The actions of ``stage`` for one training step under schedule ``name``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not supported: choose one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](stage, num_stages, num_microbatches)

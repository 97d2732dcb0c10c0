"""Pipeline schedules as data: the ordered forward/backward actions each stage runs in one step.

A schedule is a pure function of (stage, number of stages, number of micro-batches[, chunks per rank]); the
executor turns its actions into computation and point-to-point messages. Sends are posted asynchronously and each
rank blocks only on the receive its next action needs, so any order below in which every stage runs the forwards in
micro-batch order and the backwards in micro-batch order is free of deadlock; the interleaved schedule, whose ranks
run several virtual stages, is checked by :func:`simulate` before use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

ScheduleName = Literal["auto", "gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zero_bubble_v", "none"]
# "auto" is resolved to one of the others when the model is known (planning.choose_schedule)
SCHEDULE_CHOICES: tuple[str, ...] = (
    "auto",
    "gpipe",
    "1f1b",
    "interleaved_1f1b",
    "zero_bubble",
    "zero_bubble_v",
    "none",
)
DEFERRING = ("zero_bubble", "zero_bubble_v")  # schedules whose backwards defer the weight gradients


def stage_ranks(schedule: str, num_ranks: int, chunks: int) -> list[int]:
    """The pipeline rank that runs each of the ``num_ranks · chunks`` (virtual) stages: stage s on rank s % p, or,
    for the V shape of zero_bubble_v, down the ranks and back up (rank 0 runs the first and the last stage)."""
    if schedule == "zero_bubble_v":
        return list(range(num_ranks)) + list(reversed(range(num_ranks)))
    return [s % num_ranks for s in range(num_ranks * chunks)]


def chunks_of(schedule: str) -> int | None:
    """Stages per rank a schedule fixes (None: it takes ``virtual_stages``)."""
    return 2 if schedule == "zero_bubble_v" else None


class Action(NamedTuple):
    """One unit of work: ``kind`` is "F" (forward) or "B" (backward) of micro-batch ``microbatch`` on the (virtual)
    stage ``stage``: the rank's own stage, or with interleaving one of the stages it runs."""

    kind: str
    microbatch: int
    stage: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f"@{self.stage}" if self.stage else "")


def gpipe(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """Fill-drain: all forwards, then all backwards. Holds the activations of every micro-batch."""
    forwards = [Action("F", i, stage) for i in range(num_microbatches)]
    return forwards + [Action("B", i, stage) for i in range(num_microbatches)]


def one_f_one_b(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """1F1B: after a warm-up of ``num_stages - stage - 1`` forwards, alternate one forward and one backward.

    Same bubble as GPipe, but a stage holds the activations of at most ``num_stages - stage`` micro-batches.
    """
    warmup = min(num_stages - stage - 1, num_microbatches)
    actions = [Action("F", i, stage) for i in range(warmup)]
    next_backward = 0
    for i in range(warmup, num_microbatches):
        actions.append(Action("F", i, stage))
        actions.append(Action("B", next_backward, stage))
        next_backward += 1
    actions.extend(Action("B", i, stage) for i in range(next_backward, num_microbatches))
    return actions


def interleaved_1f1b(stage: int, num_stages: int, num_microbatches: int, chunks: int = 2) -> list[Action]:
    """Interleaved 1F1B (Narayanan et al. 2021): rank ``stage`` runs ``chunks`` smaller stages, the virtual stages
    ``stage``, ``stage + p``, ... of ``p · chunks``, which cuts the bubble to (p−1)/(chunks·m + p−1).

    Micro-batches go in rounds of ``p``: a round runs through the rank's first chunk, then its second, and so on;
    backwards run the chunks in reverse. After a warm-up of forwards, one forward and one backward alternate. When
    ``p`` does not divide ``m`` (or ``m < p``) the last round is shorter, and the warm-up grows until a simulation
    of every rank's order completes.
    """
    p, m = num_stages, num_microbatches
    extra = 0
    while True:
        orders = [_interleaved_order(r, p, m, chunks, extra) for r in range(p)]
        if simulate(orders, p * chunks):
            return orders[stage]
        extra += 1


def _interleaved_order(rank: int, p: int, m: int, chunks: int, extra: int) -> list[Action]:
    forwards = _chunked_forwards(rank, p, m, chunks)
    rounds = [range(start, min(start + p, m)) for start in range(0, m, p)]
    mine = [rank + j * p for j in range(chunks)]
    backwards = [Action("B", i, k) for r in rounds for k in reversed(mine) for i in r]
    warmup = min(len(forwards), (p - rank - 1) * 2 + (chunks - 1) * p + extra)
    actions = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards):
        actions += [forward, backward]
    return actions + backwards[len(forwards) - warmup :]


def _chunked_forwards(rank: int, p: int, m: int, chunks: int) -> list[Action]:
    """The forwards of a rank's chunks: micro-batches in rounds of ``p``, each round through the chunks in order."""
    rounds = [range(start, min(start + p, m)) for start in range(0, m, p)]
    return [Action("F", i, rank + j * p) for r in rounds for j in range(chunks) for i in r]


def zero_bubble_v(stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """The V-shaped zero-bubble schedule (after ZB-V, Qi et al. 2024): each rank runs two stages, one on the way
    down (stage r) and one on the way back up (stage 2p−1−r), so that rank 0 holds the first and the last stage
    and the gradients start back where the inputs came in. Backwards compute input gradients only; the deferred
    weight gradients fill the waits (the executor places them, as for zero_bubble).

    The order comes from playing the step out with equal forward and backward times: whenever a rank is free it
    starts the action that can start earliest (backwards, then the deeper stage, first), and lets a new micro-batch
    into its first stage only while it holds fewer than 2p stage-micro-batches (1F1B's activation memory).
    """
    return _v_orders(num_stages, num_microbatches)[stage]


def _v_orders(p: int, m: int) -> list[list[Action]]:
    last = 2 * p - 1
    ranks = stage_ranks("zero_bubble_v", p, 2)
    finish: dict[tuple[str, int, int], float] = {}
    next_mb = {(kind, k): 0 for kind in "FB" for k in range(last + 1)}
    free, held, orders = [0.0] * p, [0] * p, [[] for _ in range(p)]  # type: ignore[var-annotated]
    while len(finish) < 2 * (last + 1) * m:
        best: tuple[float, int, int, int, Action] | None = None
        for k in range(last + 1):
            r = ranks[k]
            for kind in "BF":
                i = next_mb[(kind, k)]
                if i >= m or (kind == "F" and k < p and held[r] >= 2 * p):  # new micro-batches within the cap
                    continue
                waits = needs(Action(kind, i, k), last + 1)
                if any(n not in finish for n in waits):
                    continue
                start = max([free[r]] + [finish[n] for n in waits])
                candidate = (start, 0 if kind == "B" else 1, -k, r, Action(kind, i, k))
                if best is None or candidate[:4] < best[:4]:
                    best = candidate
        assert best is not None, "the V schedule cannot progress"  # every micro-batch can always advance
        start, _, _, r, action = best
        free[r] = start + 1.0
        finish[(action.kind, action.microbatch, action.stage)] = free[r]
        next_mb[(action.kind, action.stage)] += 1
        held[r] += 1 if action.kind == "F" else -1
        orders[r].append(action)
    return orders


def needs(action: Action, num_virtual: int) -> list[tuple[str, int, int]]:
    """The (kind, micro-batch, stage) actions ``action`` waits for: a forward, the previous stage's forward; a
    backward, its own forward and the next stage's backward."""
    i, k = action.microbatch, action.stage
    if action.kind == "F":
        return [] if k == 0 else [("F", i, k - 1)]
    return [("F", i, k)] + ([] if k == num_virtual - 1 else [("B", i, k + 1)])


def play_out(orders: Sequence[Sequence[Action]], num_virtual: int) -> Iterator[tuple[int, Action]]:
    """(rank, action) for every action the ranks can run, in an order they could run them: each rank in its own
    order, an action only after all it :func:`needs` (sends never block). Ends early where the orders deadlock."""
    done: set[tuple[str, int, int]] = set()
    position = [0] * len(orders)
    moved = True
    while moved:
        moved = False
        for r, order in enumerate(orders):
            while position[r] < len(order):
                a = order[position[r]]
                if any(n not in done for n in needs(a, num_virtual)):
                    break
                yield r, a
                done.add((a.kind, a.microbatch, a.stage))
                position[r] += 1
                moved = True


def simulate(orders: Sequence[Sequence[Action]], num_virtual: int) -> bool:
    """Whether every rank runs its order to the end (:func:`play_out`); False means the orders would deadlock."""
    return sum(1 for _ in play_out(orders, num_virtual)) == sum(len(order) for order in orders)


def forward_only(
    stage: int, num_stages: int, num_microbatches: int, chunks: int = 1, schedule: str = "1f1b"
) -> list[Action]:
    """Evaluation: forwards only (through each of the rank's stages, in rounds of ``num_stages`` micro-batches)."""
    if schedule == "zero_bubble_v":  # the rank's stage on the way down, then the one on the way back up
        mine = [k for k, r in enumerate(stage_ranks(schedule, num_stages, 2)) if r == stage]
        return [Action("F", i, k) for k in mine for i in range(num_microbatches)]
    return _chunked_forwards(stage, num_stages, num_microbatches, chunks)


SCHEDULES: dict[str, Callable[[int, int, int], list[Action]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    # zero_bubble runs 1F1B's order; each backward computes input gradients only, and the deferred weight
    # gradients fill the waits (weight_grads.py, executor.py)
    "zero_bubble": one_f_one_b,
    # "none" is naive model parallelism: the whole batch as one micro-batch, one stage at a time.
    "none": gpipe,
}


def build_schedule(name: str, stage: int, num_stages: int, num_microbatches: int, chunks: int = 1) -> list[Action]:
    """The actions of rank ``stage`` (of ``num_stages``) for one training step under schedule ``name``; with
    ``chunks`` > 1 (interleaved_1f1b) its actions on each of its virtual stages."""
    if name == "interleaved_1f1b":
        return interleaved_1f1b(stage, num_stages, num_microbatches, chunks)
    if name == "zero_bubble_v":
        return zero_bubble_v(stage, num_stages, num_microbatches)
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not supported: choose one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](stage, num_stages, num_microbatches)

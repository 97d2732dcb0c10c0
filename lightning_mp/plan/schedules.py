"""Pipeline schedules as data: the ordered forward/backward actions each stage runs in one step.

A schedule is a pure function of (stage, number of stages, number of micro-batches[, chunks per rank]); the
executor turns its actions into computation and point-to-point messages. :func:`simulate` checks that orders
complete: with buffered sends (gloo; the interleaved schedule is checked so before use), and, with ``blocking=True``,
under NCCL's rendezvous semantics, where a send completes only once the peer's receive is posted and a rank's
operations run one batch after the other on one stream (:func:`comm_program` builds those batches as the executor
posts them: each action's receive together with the previous action's sends).
"""

from __future__ import annotations

import functools
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
INTERLEAVABLE = ("interleaved_1f1b", "zero_bubble")  # schedules that take virtual_stages > 1 (interleaved orders)


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
    return list(_interleaved_orders(num_stages, num_microbatches, chunks)[stage])


@functools.lru_cache(maxsize=64)
def _interleaved_orders(p: int, m: int, chunks: int) -> tuple[tuple[Action, ...], ...]:
    extra = 0
    while True:
        orders = [_interleaved_order(r, p, m, chunks, extra) for r in range(p)]
        if simulate(orders, p * chunks):
            return tuple(map(tuple, orders))
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
    return list(_v_orders(num_stages, num_microbatches)[stage])


@functools.lru_cache(maxsize=64)
def _v_orders(p: int, m: int) -> tuple[tuple[Action, ...], ...]:
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
    return tuple(map(tuple, orders))


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


def simulate(
    orders: Sequence[Sequence[Action]],
    num_virtual: int,
    blocking: bool = False,
    ranks: Sequence[int] | None = None,
    headers: bool = False,
    batched: bool = True,
) -> bool:
    """Whether every rank runs its order to the end; False means the orders would deadlock.

    Without ``blocking``, sends never block (:func:`play_out`). With it, the messages :func:`comm_program` derives
    (``ranks[k]``: the rank of virtual stage k, by default k % len(orders)) are played out with blocking sends
    (:func:`play_out_blocking`)."""
    if not blocking:
        return sum(1 for _ in play_out(orders, num_virtual)) == sum(len(order) for order in orders)
    ranks = list(ranks) if ranks is not None else [k % len(orders) for k in range(num_virtual)]
    return play_out_blocking(comm_program(orders, ranks, headers, batched))


Op = tuple[int, int, tuple[str, int, int], str]  # (source rank, destination rank, message, part)
Message = tuple[str, int, int]  # ("F", k, i): micro-batch i's activation into stage k; ("B", k, i): its gradient


class Exchange(NamedTuple):
    """The messages a rank exchanges at the end of ``tick``: what its action of that tick sends to other ranks, and
    what the other ranks' actions of that tick send to it. Each list is in message order, alike on both sides."""

    tick: int
    sends: tuple[tuple[int, Message], ...]  # (destination pipeline rank, message)
    recvs: tuple[tuple[int, Message], ...]  # (source pipeline rank, message)


def action_ticks(orders: Sequence[Sequence[Action]], num_virtual: int) -> list[list[int]]:
    """The tick of every action: each rank runs at most one action per tick, in its order, one tick after the
    latest of its previous action and what it :func:`needs` (the step played out with equal action times)."""
    ticks: list[list[int]] = [[] for _ in orders]
    finish: dict[tuple[str, int, int], int] = {}
    for r, a in play_out(orders, num_virtual):
        before = [ticks[r][-1]] if ticks[r] else []
        tick = max(before + [finish[n] for n in needs(a, num_virtual)], default=-1) + 1
        ticks[r].append(tick)
        finish[(a.kind, a.microbatch, a.stage)] = tick
    if sum(map(len, ticks)) != sum(map(len, orders)):
        raise ValueError("the schedule's orders deadlock: no tick plan exists")
    return ticks


def _sends_of(a: Action, ranks: Sequence[int]) -> list[tuple[int, Message]]:
    """(rank, message) for what action ``a`` sends: a forward its activation to the next stage, a backward the
    gradient of its input to the previous one."""
    if a.kind == "F" and a.stage < len(ranks) - 1:
        return [(ranks[a.stage + 1], ("F", a.stage + 1, a.microbatch))]
    if a.kind == "B" and a.stage > 0:
        return [(ranks[a.stage - 1], ("B", a.stage - 1, a.microbatch))]
    return []


def exchange_plan(orders: Sequence[Sequence[Action]], ranks: Sequence[int]) -> list[list[Exchange]]:
    """Each rank's exchanges, in tick order: the message protocol of schedules with several stages per rank.

    A message goes out at the end of the tick that computed it, and its receiver posts the receive in its exchange
    of that same tick, long before it needs it: every operation of a rank's tick-t exchange meets its peer in the
    peer's tick-t exchange, so, taken in tick order, exchanges complete with blocking sends on one stream per rank
    (each rank computes its tick-t action from exchanges before t). No message needs a key: both sides know which
    message each operation carries.
    """
    p = len(orders)
    sends: list[dict[int, list]] = [{} for _ in range(p)]
    recvs: list[dict[int, list]] = [{} for _ in range(p)]
    for r, (order, ticks) in enumerate(zip(orders, action_ticks(orders, len(ranks)))):
        for a, tick in zip(order, ticks):
            for dst, msg in _sends_of(a, ranks):
                if dst != r:
                    sends[r].setdefault(tick, []).append((dst, msg))
                    recvs[dst].setdefault(tick, []).append((r, msg))
    return [
        [
            Exchange(t, tuple(sorted(sends[r].get(t, []))), tuple(sorted(recvs[r].get(t, []))))
            for t in sorted(set(sends[r]) | set(recvs[r]))
        ]
        for r in range(p)
    ]


def comm_program(
    orders: Sequence[Sequence[Action]], ranks: Sequence[int], headers: bool = False, batched: bool = True
) -> list[list[set[Op]]]:
    """Each rank's point-to-point operations as the executor posts them: a list of batches, run in order.

    A message ("F", k, i) carries micro-batch i's activation into stage k, ("B", k, i) its gradient into stage k;
    messages between stages on one rank are handed over locally. With one stage per rank, ``batched`` (the
    executor): an action's receive goes out together with the sends queued since the last post, headers in one batch
    and tensors in the next (a receiver posts a message's tensors only once it has read its header), and sends with
    nothing to receive go out before the next computation; otherwise (the old executor) every operation is its own
    batch, sends posted at once. With several stages per rank, the exchanges of :func:`exchange_plan`, each as a
    batch of headers (when it has any) and one of tensors. With ``headers`` (a step with new shapes) activations
    carry a header.
    """
    p = len(orders)
    if len(ranks) > p:
        return _exchange_program(exchange_plan(orders, ranks), headers)
    sent_to: dict[tuple[int, int], list[Message]] = {}  # (src, dst) -> messages in send order
    for r, order in enumerate(orders):
        for a in order:
            for dst, msg in _sends_of(a, ranks):
                if dst != r:
                    sent_to.setdefault((r, dst), []).append(msg)
    programs: list[list[set[Op]]] = []
    for r, order in enumerate(orders):
        batches: list[set[Op]] = []
        outbox: dict[str, set[Op]] = {"header": set(), "tensors": set()}

        def post(part: str, ops: set[Op], batches: list[set[Op]] = batches, outbox: dict = outbox) -> None:
            if batched:
                if outbox[part] | ops:
                    batches.append(outbox[part] | ops)
                outbox[part] = set()
            else:
                batches.extend({op} for op in sorted(ops))

        for a in order:
            src = None
            if a.kind == "F" and a.stage > 0:
                src, msg = ranks[a.stage - 1], ("F", a.stage, a.microbatch)
            if a.kind == "B" and a.stage < len(ranks) - 1:
                src, msg = ranks[a.stage + 1], ("B", a.stage, a.microbatch)
            header = src is not None and headers and msg[0] == "F"
            post("header", {(src, r, msg, "header")} if header else set())
            post("tensors", {(src, r, msg, "tensors")} if src is not None else set())
            for dst, out in _sends_of(a, ranks):  # computed: its sends are queued (posted at once without batching)
                for part in ("header", "tensors") if headers and out[0] == "F" else ("tensors",):
                    if batched:
                        outbox[part].add((r, dst, out, part))
                    else:
                        batches.append({(r, dst, out, part)})
        post("header", set())
        post("tensors", set())
        programs.append(batches)
    return programs


def _exchange_program(plan: Sequence[Sequence[Exchange]], headers: bool) -> list[list[set[Op]]]:
    """The batches of :func:`exchange_plan`'s exchanges (see :func:`comm_program`)."""
    programs: list[list[set[Op]]] = []
    for r, exchanges in enumerate(plan):
        batches: list[set[Op]] = []
        for ex in exchanges:
            ops = [(r, dst, msg) for dst, msg in ex.sends] + [(src, r, msg) for src, msg in ex.recvs]
            if headers and any(msg[0] == "F" for _, _, msg in ops):
                batches.append({(a, b, msg, "header") for a, b, msg in ops if msg[0] == "F"})
            batches.append({(a, b, msg, "tensors") for a, b, msg in ops})
        programs.append(batches)
    return programs


def play_out_blocking(programs: Sequence[Sequence[set[Op]]]) -> bool:
    """Whether every rank gets through its batches when sends block: an operation completes once the source's and
    the destination's current batches both hold it; a batch completes when all its operations have."""
    pos = [0] * len(programs)
    done: list[set[Op]] = [set() for _ in programs]
    moved = True
    while moved:
        moved = False
        for r, batches in enumerate(programs):
            while pos[r] < len(batches):
                batch = batches[pos[r]]
                for op in batch - done[r]:
                    other = op[1] if op[0] == r else op[0]
                    if pos[other] < len(programs[other]) and op in programs[other][pos[other]]:
                        done[r].add(op)
                        done[other].add(op)
                if len(done[r]) < len(batch):
                    break
                pos[r] += 1
                done[r] = set()
                moved = True
    return all(pos[r] == len(batches) for r, batches in enumerate(programs))


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
    ``chunks`` > 1 (interleaved_1f1b, or zero_bubble interleaved: the same order, its weight gradients deferred)
    its actions on each of its virtual stages."""
    if name == "interleaved_1f1b" or (name in INTERLEAVABLE and chunks > 1):
        return interleaved_1f1b(stage, num_stages, num_microbatches, chunks)
    if name == "zero_bubble_v":
        return zero_bubble_v(stage, num_stages, num_microbatches)
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not supported: choose one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](stage, num_stages, num_microbatches)


class TickPlan(NamedTuple):
    """One rank's step under a schedule with several stages per rank: its actions, the tick of each, and its
    exchanges (:func:`exchange_plan`)."""

    actions: tuple[Action, ...]
    ticks: tuple[int, ...]
    exchanges: tuple[Exchange, ...]


@functools.lru_cache(maxsize=32)
def tick_plan(name: str, rank: int, num_ranks: int, num_microbatches: int, chunks: int, training: bool) -> TickPlan:
    """Rank ``rank``'s :class:`TickPlan` for a training (or, without ``training``, a forward-only) step."""
    if training:
        orders = [build_schedule(name, r, num_ranks, num_microbatches, chunks) for r in range(num_ranks)]
    else:
        orders = [forward_only(r, num_ranks, num_microbatches, chunks, name) for r in range(num_ranks)]
    ranks = stage_ranks(name, num_ranks, chunks)
    ticks = action_ticks(orders, len(ranks))
    return TickPlan(tuple(orders[rank]), tuple(ticks[rank]), tuple(exchange_plan(orders, ranks)[rank]))

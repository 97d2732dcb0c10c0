"""Stage messages of schedules with several stages per rank (interleaved 1F1B, ZB-V), exchanged tick by tick.

Two ranks then exchange the messages of several stages, each rank in its own schedule's order: read one by one as
they are needed, a sender can block (NCCL's sends are a rendezvous) on a message its peer reads late, while the
peer blocks on another. Here every rank follows :func:`lightning_mp.plan.schedules.exchange_plan`, which every rank
derives alike from the schedule: a message goes out at the end of the tick that computed it, and its receiver posts
the receive in the same tick's exchange, ahead of need. Exchanges are posted in tick order, a rank posting those
before an action's tick just before the action; each is one batch of headers (only when a message's structure is new
under its ``spec_key``, as in :mod:`lightning_mp.runtime.messages`) and one batch of tensors. Since both sides know
which message every operation carries, no message carries a key, and a steady-state step sends no header and reads
nothing on the host.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_mp.plan.schedules import Exchange, Message
from lightning_mp.runtime.messages import (
    FRAME_BYTES,
    P2P,
    Received,
    TensorMeta,
    decode_frames,
    encode_frames,
    flatten,
    frame_overflow,
    input_grads,
    known_structure,
    remember,
    unflatten,
)


@dataclass
class _Outgoing:
    tensors: list[Tensor]
    header: tuple[Any, list[TensorMeta]] | None = None  # (structure, metas) when the receiver cannot know it


@dataclass
class _Incoming:
    tensors: list[Tensor] = field(default_factory=list)
    works: list[Any] = field(default_factory=list)
    spec: Any = None
    metas: list[TensorMeta] = field(default_factory=list)
    src: int = -1


def _label(msg: Message) -> str:
    what = "activation" if msg[0] == "F" else "gradient"
    return f"the {what} of micro-batch {msg[2]} for stage {msg[1]}"


class TickExchange:
    """Posts one rank's exchanges of a step and hands received messages to its actions.

    ``global_rank(r)`` is the global rank of pipeline rank ``r``. Per step: :meth:`start` with the rank's exchanges;
    :meth:`put` / :meth:`put_grads` after computing a message, :meth:`advance` before each action, :meth:`take` /
    :meth:`take_grads` for what the action needs, :meth:`finish` at the end.
    """

    def __init__(self, p2p: P2P, global_rank: Callable[[int], int]) -> None:
        self.p2p = p2p
        self.global_rank = global_rank
        self._pending: collections.deque[Exchange] = collections.deque()
        self._destinations: dict[Message, int] = {}  # pipeline rank of each message sent to another rank
        self._spec_key: Callable[[int, int], Any] | None = None
        self._outgoing: dict[Message, _Outgoing] = {}
        self._incoming: dict[Message, _Incoming] = {}
        self._local: dict[Message, Received | list[Tensor]] = {}  # between two stages of this rank
        self._grad_metas: dict[Message, list[TensorMeta]] = {}  # what the gradients of each sent activation are
        self._sent_specs: dict[int, dict[Any, Any]] = {}  # by destination pipeline rank, by spec_key
        self._recv_specs: dict[int, dict[Any, Any]] = {}  # by source pipeline rank, by spec_key

    def start(self, exchanges: Sequence[Exchange], spec_key: Callable[[int, int], Any] | None = None) -> None:
        """Begin a step; ``spec_key(stage, i)`` is what the structure of stage ``stage``'s output for micro-batch
        ``i`` is known by (alike on every rank; None: every activation sends its header)."""
        self._pending = collections.deque(exchanges)
        self._destinations = {msg: dst for ex in exchanges for dst, msg in ex.sends}
        self._spec_key = spec_key
        self._outgoing, self._incoming, self._local, self._grad_metas = {}, {}, {}, {}

    # what actions hand over -------------------------------------------------------------------------------------
    def put(self, msg: Message, value: Any) -> list[Tensor]:
        """Hand over the activation ``msg`` (posted at its tick); returns its tensors (the gradients of those that
        need one come back)."""
        tensors, spec = flatten(value)
        metas = [TensorMeta(tuple(t.shape), t.dtype, t.requires_grad) for t in tensors]
        self._grad_metas[("B", msg[1] - 1, msg[2])] = [m for m in metas if m.requires_grad]
        if msg not in self._destinations:  # the next stage runs on this rank
            grad = torch.is_grad_enabled()
            copies = [t.detach().clone().requires_grad_(m.requires_grad and grad) for t, m in zip(tensors, metas)]
            self._local[msg] = Received(unflatten(spec, copies), copies, metas)
            return tensors
        header: tuple[Any, list[TensorMeta]] | None = (spec, metas)
        key = self._key(msg)
        if key is not None:
            known = self._sent_specs.setdefault(self._destinations[msg], {})
            if known_structure(known, key, spec, metas, _label(msg)):
                header = None
        self._outgoing[msg] = _Outgoing([t.detach().contiguous() for t in tensors], header)
        return tensors

    def put_grads(self, msg: Message, received: Received) -> None:
        """Hand over the gradients of ``received``'s tensors that needed one (zeros where none arrived)."""
        grads = input_grads(received)
        if msg in self._destinations:
            self._outgoing[msg] = _Outgoing(grads)
        else:
            self._local[msg] = [g.detach() for g in grads]

    def take(self, msg: Message) -> Received:
        """The activation ``msg``, its tensors that need a gradient as leaves that do."""
        if msg in self._local:
            local = self._local.pop(msg)
            assert isinstance(local, Received)
            return local
        incoming = self._arrived(msg)
        grad = torch.is_grad_enabled()
        for t, m in zip(incoming.tensors, incoming.metas):
            t.requires_grad_(m.requires_grad and grad)
        return Received(unflatten(incoming.spec, incoming.tensors), incoming.tensors, incoming.metas)

    def take_grads(self, msg: Message, fill: Callable[[], bool] | None = None) -> list[Tensor]:
        """The gradients ``msg``; while they have not arrived, ``fill()`` runs other work (until it returns False)."""
        if msg in self._local:
            local = self._local.pop(msg)
            assert isinstance(local, list)
            return local
        incoming = self._incoming[msg]
        if fill is not None:
            while not all(w.is_completed() for w in incoming.works) and fill():
                pass
        return self._arrived(msg).tensors

    def _arrived(self, msg: Message) -> _Incoming:
        incoming = self._incoming.pop(msg)
        self.p2p.wait(incoming.works, incoming.src, _label(msg))
        return incoming

    # posting ------------------------------------------------------------------------------------------------------
    def advance(self, tick: int) -> None:
        """Post the exchanges of the ticks before ``tick``."""
        while self._pending and self._pending[0].tick < tick:
            self._post(self._pending.popleft())

    def advance_computed(self, tick: int) -> None:
        """Post, in order, the exchanges of ticks up to ``tick`` whose messages this rank has all computed."""
        while (
            self._pending
            and self._pending[0].tick <= tick
            and all(msg in self._outgoing for _, msg in self._pending[0].sends)
        ):
            self._post(self._pending.popleft())

    def finish(self) -> None:
        """Post the step's remaining exchanges."""
        self.advance(1 << 62)

    def _key(self, msg: Message) -> Any:
        """The ``spec_key`` of activation ``msg`` (None: unknown, its header always goes)."""
        return None if self._spec_key is None else self._spec_key(msg[1] - 1, msg[2])

    def _post(self, ex: Exchange) -> None:
        recvs = [(src, msg) for src, msg in ex.recvs]
        headers = self._read_headers(ex)
        sends: list[tuple[Tensor, int, str]] = []
        for dst, msg in ex.sends:
            for t in self._outgoing.pop(msg).tensors:
                sends.append((t, self.global_rank(dst), _label(msg)))
        posted: list[tuple[Tensor, int]] = []
        for src, msg in recvs:
            if msg[0] == "F":
                spec, metas = headers[msg] if msg in headers else self._recv_specs[src][self._key(msg)]
            else:
                spec, metas = None, self._grad_metas.pop(msg)
            tensors = [torch.empty(m.shape, dtype=m.dtype, device=self.p2p.device) for m in metas]
            self._incoming[msg] = _Incoming(tensors, [], spec, metas, self.global_rank(src))
            posted += [(t, self.global_rank(src)) for t in tensors]
        if not sends and not posted:
            return
        works = self.p2p.post(sends, posted, f"the messages of tick {ex.tick}")
        at = 0
        for _, msg in recvs:
            incoming = self._incoming[msg]
            incoming.works = works[at : at + len(incoming.tensors)]
            at += len(incoming.tensors)

    def _read_headers(self, ex: Exchange) -> dict[Message, tuple[Any, list[TensorMeta]]]:
        """Exchange the headers of the tick's new structures (both sides know which): one batch of first frames and,
        for long headers, one of the rest; returns the structures received."""
        device = self.p2p.device
        frames = [(dst, msg, encode_frames(pickle.dumps(self._outgoing[msg].header), device))
                  for dst, msg in ex.sends if self._outgoing[msg].header is not None]  # fmt: skip
        firsts = {
            msg: torch.empty(FRAME_BYTES, dtype=torch.uint8, device=device)
            for src, msg in ex.recvs
            if msg[0] == "F" and (self._key(msg) is None or self._key(msg) not in self._recv_specs.get(src, {}))
        }
        if not frames and not firsts:
            return {}
        src_of = {msg: src for src, msg in ex.recvs}
        peer = self.global_rank(ex.recvs[0][0] if ex.recvs else ex.sends[0][0])
        self.p2p.counts.headers += sum(len(f) for _, _, f in frames)
        sends = [(f[0], self.global_rank(dst), _label(msg)) for dst, msg, f in frames]
        recvs = [(t, self.global_rank(src_of[msg])) for msg, t in firsts.items()]
        label = f"the message headers of tick {ex.tick}"
        self.p2p.wait(self.p2p.post(sends, recvs, label), peer, label)
        rests = {msg: torch.empty(frame_overflow(t), dtype=torch.uint8, device=device)
                 for msg, t in firsts.items() if frame_overflow(t)}  # fmt: skip
        long_sends = [(f[1], self.global_rank(dst), _label(msg)) for dst, msg, f in frames if len(f) > 1]
        if long_sends or rests:
            recvs = [(t, self.global_rank(src_of[msg])) for msg, t in rests.items()]
            self.p2p.wait(self.p2p.post(long_sends, recvs, label), peer, label)
        out = {}
        for msg, first in firsts.items():
            header = pickle.loads(decode_frames(first, rests.get(msg)))
            key = self._key(msg)
            if key is not None:
                remember(self._recv_specs.setdefault(src_of[msg], {}), key, header)
            out[msg] = header
        return out

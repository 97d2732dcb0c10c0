"""Point-to-point messages between neighbouring stages: any structure of tensors, with shapes that may change.

A forward message carries what a stage's last block returned: a tensor, or a tuple/list/dict/dataclass of
tensors and constants. Its structure (each tensor's shape, dtype and whether it needs a gradient) travels as a
pickled header in one fixed-size frame before the tensors, so shapes may change from micro-batch to micro-batch.
The header is sent only when the receiver cannot know it: a message given a ``spec_key`` (the executor's: the
sending stage and the micro-batch's own shapes, which every stage of a pipeline holds alike) sends its header the
first time that key is used between two ranks; both sides keep the structure under the key, so a steady-state step
sends no header and reads nothing on the host. A message whose structure changes under a key it was seen with
before fails at once, naming the fix. Gradients travel back without a header: the receiver knows their shapes from
the forward message.

Why batches: NCCL's point-to-point is a rendezvous (a send completes only when the peer posts the receive) and one
rank's operations run in order on one stream, so "stage 0 sends a2 then receives g0" against "stage 1 sends g0 then
receives a2" hangs once messages are large. Sends are therefore queued, not posted, and go out together with the
next receive in one ``batch_isend_irecv`` (or on their own, :meth:`P2P.flush`, before the next computation): the
operations of one batch progress together, and :func:`lightning_mp.plan.schedules.simulate` proves every schedule
free of deadlock under these semantics. On gloo, whose sends are buffered, the same operations are posted one by one
(the same order, less Python per message). A send's buffer is released as soon as that send completes.

With several stages per rank (interleaved, V schedules) two ranks exchange the messages of several stages, each in
its own schedule's order: those go tick by tick (:mod:`lightning_mp.runtime.exchange`), on the operations here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mp.runtime.errors import PipelineError
from lightning_mp.runtime.tree import tree_map

if TYPE_CHECKING:
    from lightning_mp.runtime.watchdog import FailureWatch

# ---- structure <-> flat list of tensors -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a flattened structure: its index in the flat list."""

    index: int


def flatten(obj: Any) -> tuple[list[Tensor], Any]:
    """Flat list of the tensors in ``obj`` and a picklable spec (the structure, each tensor replaced by its slot)
    that :func:`unflatten` rebuilds it from."""
    tensors: list[Tensor] = []

    def slot(tensor: Tensor) -> _Slot:
        tensors.append(tensor)
        return _Slot(len(tensors) - 1)

    return tensors, tree_map(slot, obj)


def unflatten(spec: Any, tensors: list[Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    return tree_map(lambda s: tensors[s.index], spec, is_leaf=lambda x: isinstance(x, _Slot))


# ---- framing: a pickled payload in one fixed-size message (two when it is large) -------------------------------

FRAME_BYTES = 4096
_LENGTH_BYTES = 8


def encode_frames(payload: bytes, device: torch.device) -> list[Tensor]:
    """``payload`` as a fixed-size first frame (its length, then as much as fits) and, if needed, the rest."""
    data = len(payload).to_bytes(_LENGTH_BYTES, "little") + payload
    first = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
    head = data[:FRAME_BYTES]
    first[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    frames = [first.to(device)]
    if len(data) > FRAME_BYTES:
        frames.append(torch.frombuffer(bytearray(data[FRAME_BYTES:]), dtype=torch.uint8).to(device))
    return frames


def frame_overflow(first: Tensor) -> int:
    """Bytes of the payload that did not fit in the first frame (the size of the second frame, or 0)."""
    length = int.from_bytes(first[:_LENGTH_BYTES].cpu().numpy().tobytes(), "little")
    return max(0, _LENGTH_BYTES + length - FRAME_BYTES)


def decode_frames(first: Tensor, rest: Tensor | None) -> bytes:
    """The payload carried by :func:`encode_frames`' frames."""
    length = int.from_bytes(first[:_LENGTH_BYTES].cpu().numpy().tobytes(), "little")
    data = first.cpu().numpy().tobytes()[_LENGTH_BYTES:]
    if rest is not None:
        data += rest.cpu().numpy().tobytes()
    return data[:length]


def broadcast_object(obj: Any, src: int, group: dist.ProcessGroup | None, device: torch.device) -> Any:
    """``obj`` from global rank ``src`` on every rank of ``group``: one collective for small objects, two for large."""
    is_src = dist.get_rank() == src
    frames = (
        encode_frames(dump_object(obj), device)
        if is_src
        else [torch.empty(FRAME_BYTES, dtype=torch.uint8, device=device)]
    )
    dist.broadcast(frames[0], src, group=group)
    overflow = frame_overflow(frames[0])
    if overflow:
        if not is_src:
            frames.append(torch.empty(overflow, dtype=torch.uint8, device=device))
        dist.broadcast(frames[1], src, group=group)
    return obj if is_src else load_object(decode_frames(frames[0], frames[1] if overflow else None), device)


def all_gather_objects(obj: Any, group: dist.ProcessGroup | None, device: torch.device) -> list[Any]:
    """Every rank's ``obj`` on every rank of ``group``, in group-rank order: one collective for small objects."""
    return [load_object(data, device) for data in all_gather_bytes(dump_object(obj), group, device)]


def all_gather_bytes(data: bytes, group: dist.ProcessGroup | None, device: torch.device) -> list[bytes]:
    """Every rank's ``data`` on every rank of ``group``, in group-rank order: one collective when each fits in a
    frame (:data:`FRAME_BYTES`), two otherwise."""
    world = dist.get_world_size(group)
    frames = encode_frames(data, device)
    firsts = [torch.empty(FRAME_BYTES, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(firsts, frames[0], group=group)
    overflows = [frame_overflow(f) for f in firsts]
    rests: list[Tensor | None] = [None] * world
    if any(overflows):
        longest = max(overflows)
        mine = torch.zeros(longest, dtype=torch.uint8, device=device)
        if len(frames) > 1:
            mine[: frames[1].numel()] = frames[1]
        padded = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
        dist.all_gather(padded, mine, group=group)
        rests = [p[:n] if n else None for p, n in zip(padded, overflows)]
    return [decode_frames(f, r) for f, r in zip(firsts, rests)]


def dump_object(obj: Any) -> bytes:
    """``obj`` (losses, logged values, metric states, predictions) as bytes for another rank."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_object(data: bytes, device: torch.device) -> Any:
    """An object from :func:`dump_object`, its tensors on ``device`` (the receiver's, not the sender's GPU)."""
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


# ---- messages ---------------------------------------------------------------------------------------------------

SPECS_PER_PEER = 1024  # structures kept per peer; both sides clear at the same message, so they stay in step


@dataclasses.dataclass
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclasses.dataclass
class Received:
    """A forward message: the rebuilt structure and its tensors (leaves where a gradient flows back)."""

    value: Any
    tensors: list[Tensor]
    metas: list[TensorMeta]


@dataclasses.dataclass
class MessageCounts:
    """What this rank has posted: tensor operations (``messages``, sends and receives), ``headers`` sent (pickled
    structures) and ``batches`` (posts of one or more operations). Counted for tests and benchmarks."""

    messages: int = 0
    headers: int = 0
    batches: int = 0


@dataclasses.dataclass
class PendingGrads:
    """Gradients being received (:meth:`P2P.irecv_grads`)."""

    p2p: P2P
    outputs: list[Tensor]
    grads: list[Tensor]
    works: list[Any]
    src: int
    label: str

    def ready(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> tuple[list[Tensor], list[Tensor]]:
        """(tensors, gradients) once every gradient has arrived."""
        self.p2p.wait(self.works, self.src, self.label)
        return self.outputs, self.grads


class P2P:
    """Sends and receives stage messages to and from global ranks (see the module docstring for the protocol).

    Each operation carries a label ("the activation of micro-batch 3"): a failed or timed-out operation raises a
    :class:`PipelineError` naming this rank, the label, the direction and the peer (and, with a ``watch``, the
    first failure another rank reported, which is usually the cause). ``batched`` (default: on any backend but
    gloo) posts each step's operations with ``batch_isend_irecv``.
    """

    def __init__(
        self,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        watch: FailureWatch | None = None,
        describe: Callable[[int], str] = lambda rank: f"rank {rank}",
        batched: bool | None = None,
    ) -> None:
        self.device = device
        self.group = group
        self.watch = watch
        self.describe = describe
        self.batched = batched
        self.counts = MessageCounts()
        self._outbox: list[tuple[Tensor, int, str]] = []  # sends queued until the next receive or flush
        self._sending: list[tuple[Any, Tensor, int, str]] = []  # posted sends, kept until complete
        self._sent_specs: dict[int, dict[Any, tuple[Any, list[TensorMeta]]]] = {}  # by destination, by spec_key
        self._recv_specs: dict[int, dict[Any, tuple[Any, list[TensorMeta]]]] = {}  # by source, by spec_key
        # on a device whose receives return before the data arrives (NCCL), the watch follows the posted works
        self._track = watch is not None and device.type != "cpu"

    # forward direction -----------------------------------------------------------------------------------------
    def send_activation(self, value: Any, dst: int, label: str = "an activation", spec_key: Any = None) -> list[Tensor]:
        """Queue ``value`` for ``dst``; return its tensors (the ones whose gradients will come back). With
        ``spec_key`` its header goes only the first time the key is used towards ``dst``."""
        tensors, spec = flatten(value)
        metas = [TensorMeta(tuple(t.shape), t.dtype, t.requires_grad) for t in tensors]
        seen = None
        if spec_key is not None:
            seen = known_structure(self._sent_specs.setdefault(dst, {}), spec_key, spec, metas, label)
        if seen is None:  # the receiver cannot know the structure
            for frame in encode_frames(pickle.dumps((spec, metas)), self.device):
                self._outbox.append((frame, dst, label))
                self.counts.headers += 1
        for t in tensors:
            self._outbox.append((t.detach().contiguous(), dst, label))
        return tensors

    def recv_activation(self, src: int, label: str = "an activation", spec_key: Any = None) -> Received:
        """Receive a forward message from ``src``; tensors that need a gradient come back as leaves that do."""
        known = self._recv_specs.setdefault(src, {}) if spec_key is not None else None
        cached = known.get(spec_key) if known is not None else None
        if cached is None:
            header, tensors = self._recv_message(src, label)
            if known is not None:
                remember(known, spec_key, header)
            spec, metas = header
        else:
            spec, metas = cached
            tensors = [torch.empty(m.shape, dtype=m.dtype, device=self.device) for m in metas]
            self.wait(self.post([], [(t, src) for t in tensors], label), src, label)
            for t, m in zip(tensors, metas):
                t.requires_grad_(m.requires_grad and torch.is_grad_enabled())
        return Received(unflatten(spec, tensors), tensors, metas)

    def _recv_message(self, src: int, label: str) -> tuple[Any, list[Tensor]]:
        """(header, tensors) of the next message from ``src``; the header's last item is the tensors' metas."""
        first = torch.empty(FRAME_BYTES, dtype=torch.uint8, device=self.device)
        self.wait(self.post([], [(first, src)], label), src, label)
        rest = None
        if frame_overflow(first):
            rest = torch.empty(frame_overflow(first), dtype=torch.uint8, device=self.device)
            self.wait(self.post([], [(rest, src)], label), src, label)
        header = pickle.loads(decode_frames(first, rest))
        tensors = [torch.empty(m.shape, dtype=m.dtype, device=self.device) for m in header[-1]]
        if tensors:
            self.wait(self.post([], [(t, src) for t in tensors], label), src, label)
        for t, meta in zip(tensors, header[-1]):
            t.requires_grad_(meta.requires_grad and torch.is_grad_enabled())
        return header, tensors

    # backward direction ----------------------------------------------------------------------------------------
    def send_grads(self, received: Received, dst: int, label: str = "a gradient") -> None:
        """Queue the gradients of the received leaves that needed one (zeros where none arrived)."""
        self._outbox += [(grad, dst, label) for grad in input_grads(received)]

    def recv_grads(self, sent: list[Tensor], src: int, label: str = "a gradient") -> tuple[list[Tensor], list[Tensor]]:
        """Receive the gradients of the sent tensors that need one; return (tensors, gradients) for backward."""
        return self.irecv_grads(sent, src, label).wait()

    def irecv_grads(self, sent: list[Tensor], src: int, label: str = "a gradient") -> PendingGrads:
        """Post the receives of :meth:`recv_grads` (with the queued sends) without waiting; the caller may work until
        they are ready."""
        outputs = [t for t in sent if t.requires_grad]
        grads = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in outputs]
        works = self.post([], [(g, src) for g in grads], label) if grads or self._outbox else []
        return PendingGrads(self, outputs, grads, works, src, label)

    # plumbing --------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Post the queued sends now (before a computation that receives nothing first)."""
        if self._outbox:
            self.post([], [], "")

    def post(self, sends: list[tuple[Tensor, int, str]], recvs: list[tuple[Tensor, int]], label: str) -> list[Any]:
        """Post the queued sends, ``sends`` and the receives ``recvs`` together; return the receives' works."""
        sends = self._outbox + sends
        self._outbox = []
        if self._sending:  # release the buffers of the sends that have completed
            self._sending = [s for s in self._sending if not s[0].is_completed()]
        if self.batched is None:  # gloo buffers its sends: posting one by one is as safe, and cheaper
            self.batched = dist.get_backend(self.group) != "gloo"
        batched = self.batched
        counts = self.counts
        counts.batches += 1
        counts.messages += len(sends) + len(recvs)
        try:
            if batched:
                ops = [dist.P2POp(dist.isend, t, dst, self.group) for t, dst, _ in sends]
                ops += [dist.P2POp(dist.irecv, t, src, self.group) for t, src in recvs]
                works = dist.batch_isend_irecv(ops) if ops else []
                if len(works) != len(ops):  # one work for the whole batch (NCCL's coalesced group)
                    works = works[:1] * len(ops)
            else:
                works = [dist.isend(t, dst, group=self.group) for t, dst, _ in sends]
                works += [dist.irecv(t, src, group=self.group) for t, src in recvs]
        except RuntimeError as err:
            peer = recvs[0][1] if recvs else sends[0][1]
            raise self._error("receive" if recvs else "send", label or sends[0][2], peer, err) from err
        n = len(sends)
        for work, (t, dst, what) in zip(works, sends):
            self._sending.append((work, t, dst, what))
        if self._track and self.watch is not None:
            for work, (_, dst, what) in zip(works, sends):
                self.watch.track(work, dst, f"send {what}")
            for work, (_, src) in zip(works[n:], recvs):
                self.watch.track(work, src, f"receive {label}")
        return works[n:]

    def wait(self, works: list[Any], src: int, label: str) -> None:
        with self._waiting(src, f"receive {label}"):
            for work in works:
                try:
                    work.wait()
                except RuntimeError as err:
                    raise self._error("receive", label, src, err) from err

    def wait_sends(self) -> None:
        """Post the queued sends and block until every send posted so far has completed (their buffers are freed)."""
        self.flush()
        for work, _, dst, label in self._sending:
            with self._waiting(dst, f"send {label}"):
                try:
                    work.wait()
                except RuntimeError as err:
                    raise self._error("send", label, dst, err) from err
        self._sending.clear()

    def _waiting(self, peer: int, what: str) -> contextlib.AbstractContextManager:
        return self.watch.waiting(peer, what) if self.watch is not None else contextlib.nullcontext()

    def _error(self, direction: str, label: str, peer: int, err: BaseException) -> PipelineError:
        me = self.describe(dist.get_rank()) if dist.is_initialized() else "this rank"
        where = "from" if direction == "receive" else "to"
        cause = self.watch.failure() if self.watch is not None else None
        if cause:
            reason = f"{cause[0].upper()}{cause[1:]}."
        elif "timed out" in str(err).lower():
            reason = (
                "That rank is stuck or much slower than this one; if its step legitimately takes this long, raise"
                " ModelParallel(timeout=...)."
            )
        else:
            reason = "That rank failed or was stopped: its own output says why."
        detail = str(err).strip().rstrip(".")
        return PipelineError(f"{me} could not {direction} {label} {where} {self.describe(peer)}: {detail}. {reason}")


def input_grads(received: Received) -> list[Tensor]:
    """The gradients of a received message's tensors that needed one (zeros where none arrived), to send back."""
    return [
        (t.grad if t.grad is not None else torch.zeros_like(t)).contiguous()
        for t, meta in zip(received.tensors, received.metas)
        if meta.requires_grad
    ]


def known_structure(
    known: dict[Any, Any], spec_key: Any, spec: Any, metas: list[TensorMeta], label: str
) -> tuple[Any, list[TensorMeta]] | None:
    """The structure sent before under ``spec_key`` (None: the first time; it is remembered), checked against this
    message's: one that changed for micro-batches of the same shapes fails, naming the fix."""
    seen = known.get(spec_key)
    if seen is None:
        remember(known, spec_key, (spec, metas))
    elif seen[1] != metas or not _same(seen[0], spec):
        before, now = [m.shape for m in seen[1]], [m.shape for m in metas]
        raise PipelineError(
            f"{label} changed structure or shapes ({before} before, {now} now) for micro-batches of the same"
            " shapes: a stage's output must depend on the shapes"
            " of the batch only, not on its values (the next stage posts its receive from the shapes). Make"
            " the blocks' outputs the same for same-shaped batches, e.g. pad instead of trimming."
        )
    return seen


def remember(known: dict[Any, Any], spec_key: Any, header: Any) -> None:
    """Keep ``header`` under ``spec_key``; at the limit start afresh (the peer does so at the same message)."""
    if len(known) >= SPECS_PER_PEER:
        known.clear()
    known[spec_key] = header


def _same(a: Any, b: Any) -> bool:
    """Whether two message structures are equal (one whose constants cannot be compared counts as changed)."""
    try:
        return bool(a == b)
    except Exception:
        return False

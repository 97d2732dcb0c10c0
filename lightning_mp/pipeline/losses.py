"""The loss of a step: found in the step's output (one rule for every place that needs it), and recognised as a
mean over some number of elements (tokens, samples), so that micro-batches weigh in as one whole batch would."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lightning_mp.runtime.errors import PipelineError


def step_loss(output: Any, hook: str = "training_step", strict: bool = True) -> Tensor | None:
    """The loss in what a step returned: the tensor itself, or a mapping's ``"loss"``; None for None.

    Raises:
        PipelineError: with ``strict``, when ``output`` is something else (automatic optimization needs a loss).
    """
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    if not strict:
        return None
    raise PipelineError(
        f"{hook} returned a {type(output).__name__}; under automatic optimization it must return the loss"
        " tensor, a dict with a 'loss' key, or None."
    )


# ---- which losses are means, and over how many elements ------------------------------------------------------------


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _is_mean(args: tuple, kwargs: dict, index: int) -> bool:
    """A reduction of "mean" (given or by default; the legacy ``size_average``/``reduce`` flags are not read)."""
    legacy = kwargs.get("size_average") is not None or kwargs.get("reduce") is not None
    return not legacy and _arg(args, kwargs, index, "reduction", "mean") == "mean"


def _class_count(args: tuple, kwargs: dict) -> Tensor | None:
    """Elements a mean cross-entropy / NLL divides by: the summed class weights of the targets not ignored (their
    number without weights); for class-probability targets, the number of samples."""
    inputs, target = args[0], _arg(args, kwargs, 1, "target")
    if not isinstance(target, Tensor) or not isinstance(inputs, Tensor):
        return None
    if target.is_floating_point():  # probabilities over the classes (dim 1, or 0 unbatched)
        return torch.tensor(target.numel() // max(inputs.shape[1 if inputs.dim() > 1 else 0], 1), device=target.device)
    weight = kwargs.get("weight")
    valid = target != kwargs.get("ignore_index", -100)
    if weight is None:
        return valid.sum()
    return (weight[target.masked_fill(~valid, 0)] * valid).sum()


def _elementwise_count(args: tuple, kwargs: dict) -> Tensor | None:
    """Elements an element-wise mean loss divides by: the broadcast shape of input and target."""
    inputs, target = args[0], _arg(args, kwargs, 1, "target")
    if not isinstance(inputs, Tensor) or not isinstance(target, Tensor):
        return None
    return torch.tensor(torch.broadcast_shapes(inputs.shape, target.shape).numel())


# function -> (index of its ``reduction`` argument, count of averaged elements, computed as a sum first)
_MEAN_LOSSES: dict[Callable, tuple[int, Callable[[tuple, dict], Tensor | None], bool]] = {
    F.cross_entropy: (6, _class_count, True),
    F.nll_loss: (6, _class_count, True),
    F.mse_loss: (4, _elementwise_count, False),
    F.l1_loss: (4, _elementwise_count, False),
    F.smooth_l1_loss: (4, _elementwise_count, False),
    F.huber_loss: (2, _elementwise_count, False),
    F.binary_cross_entropy: (5, _elementwise_count, False),
    F.binary_cross_entropy_with_logits: (5, _elementwise_count, False),
}


@dataclass
class MeanCall:
    """A mean-reduced loss computed in a micro-batch's step: its output, the sum it averages and the count."""

    output: Tensor
    count: Tensor  # elements (or summed class weights) it divides by, on the loss's device
    total: Tensor | None = None  # the sum it divides (None: ``output * count``)

    def as_sum(self) -> Tensor:
        return self.total if self.total is not None else self.output * self.count


class MeanLossRecorder(TorchFunctionMode):
    """Sees the mean-reduced losses (``F.cross_entropy`` and ``nn.CrossEntropyLoss``, ``F.nll_loss``, ``mse``/``l1``
    style losses, a full ``Tensor.mean``) that the user's step computes, with the number of elements each averages.

    A class-index cross-entropy or NLL is computed as its sum over the count (the same value): a micro-batch whose
    every target is ignored then still back-propagates zeros, where its mean would be 0/0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[MeanCall] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rule = _MEAN_LOSSES.get(func)
        if rule is not None and _is_mean(args, kwargs, rule[0]):
            count = rule[1](args, kwargs)
            if count is not None:
                if rule[2] and not _arg(args, kwargs, 1, "target").is_floating_point():
                    total = func(*args, **{**kwargs, "reduction": "sum"})
                    output = total / count.to(total.dtype)
                    self.calls.append(MeanCall(output, count.to(total.device), total))
                    return output
                output = func(*args, **kwargs)
                self.calls.append(MeanCall(output, count.to(output.device)))
                return output
        if func in (Tensor.mean, torch.mean) and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            output = func(*args)
            self.calls.append(MeanCall(output, torch.tensor(args[0].numel(), device=output.device)))
            return output
        return func(*args, **kwargs)

    def find(self, value: Any) -> MeanCall | None:
        """The recorded call whose output ``value`` is (the very tensor), if any."""
        return next((c for c in reversed(self.calls) if c.output is value), None)


class RecorderPlacement:
    """Where a micro-batch's :class:`MeanLossRecorder` is on: from the model's last layer on, where one process's
    loss is computed, so that the layers' own torch calls (most of them) do not pass through it (~6 µs each).

    The first micro-batch of each kind of step (``training_step``, ``validation_step``, ...) is recorded whole and
    shows whether that is safe: nothing recognised as a mean loss ran in the layers, and no torch function mode of the
    model's own is open when the last layer returns (the recorder is entered there, and such a mode would be closed
    over it). Otherwise, or once a later micro-batch opens such a mode, that kind of step is recorded whole.
    """

    def __init__(self) -> None:
        self.after_layers: dict[str, bool] = {}  # by step kind; absent: not known yet

    @contextlib.contextmanager
    def recording(
        self, recorder: MeanLossRecorder, arm: Callable[[Callable[[], None] | None], None], kind: str
    ) -> Iterator[None]:
        """Run the body (one micro-batch's step of ``kind``) with ``recorder`` on. ``arm(f)`` makes the stage call
        ``f()`` when the model's last layer has returned (``arm(None)`` disarms)."""
        depth = torch._C._len_torch_function_stack()
        if self.after_layers.get(kind):
            entered = False

            def enter() -> None:
                nonlocal entered
                if entered:
                    return
                if torch._C._len_torch_function_stack() != depth:  # a mode of the model's own is open
                    self.after_layers[kind] = False
                    return
                recorder.__enter__()
                entered = True

            arm(enter)
            try:
                yield
            finally:
                arm(None)
                if entered:
                    recorder.__exit__(None, None, None)
            return
        seen: list[bool] = []
        arm(lambda: seen.append(torch._C._len_torch_function_stack() == depth + 1 and not recorder.calls))
        try:
            with recorder:
                yield
        finally:
            arm(None)
        if kind not in self.after_layers and seen:
            self.after_layers[kind] = seen[0]


LOSS_NORMALIZATIONS = ("auto", "samples", "global_tokens")


class StepLosses:
    """How one step's micro-batch losses add up to the loss of the whole batch, on the stage that computes them.

    When every micro-batch's loss is the output of one recognised mean (see :class:`MeanLossRecorder`), micro-batch
    ``i`` contributes its sum ``S_i`` and the batch loss is ``ΣS_i / ΣN_i``, as one process computes it however
    the valid tokens fall into micro-batches. ``ΣN_i`` is known only after the last forward, so each backward runs on
    ``S_i / ref`` (``ref`` = the first micro-batch's count × m, a scale of the right size) and the step's gradients
    are multiplied by ``ref / ΣN_i`` afterwards (:attr:`grad_scale`). Otherwise (or with ``mode="samples"``) each
    micro-batch weighs in by its share of the samples, as Lightning's gradient accumulation does.
    """

    def __init__(self, sizes: list[int], loss_scale: float, mode: str = "auto") -> None:
        total = sum(sizes)
        self.sample_weights = [s / total for s in sizes]
        self.loss_scale = loss_scale
        self.mode = mode
        self.recorders: dict[int, MeanLossRecorder] = {}
        self.calls: dict[int, MeanCall] = {}
        self.by_tokens: bool | None = None  # decided by the first micro-batch whose loss is seen
        self.unrecognised_reason: str | None = None
        self._ref: Tensor | None = None

    def recorder(self, index: int) -> MeanLossRecorder:
        """A fresh recorder for micro-batch ``index``'s step."""
        self.recorders[index] = MeanLossRecorder()
        return self.recorders[index]

    def log_weight(self, index: int, value: Any) -> Any:
        """How much micro-batch ``index``'s logged ``value`` counts in the step's mean of that key: the count of the
        mean it is (a logged loss), else the micro-batch's share of the samples."""
        recorder = self.recorders.get(index)
        call = recorder.find(value) if recorder is not None and self.mode != "samples" else None
        return call.count if call is not None else self.sample_weights[index]

    def backward_loss(self, index: int, loss: Tensor) -> Tensor:
        """What micro-batch ``index`` back-propagates for its step ``loss``."""
        recorder = self.recorders.get(index)
        call = recorder.find(loss) if recorder is not None and self.mode != "samples" else None
        if self.by_tokens is None:
            self.by_tokens = call is not None
            if call is None and self.mode != "samples":
                self.unrecognised_reason = _why_unrecognised(recorder)
            if call is not None:
                self._ref = call.count.clamp(min=1).to(loss.dtype) * len(self.sample_weights)
        if not self.by_tokens:
            return loss * (self.sample_weights[index] * self.loss_scale)
        if call is None:
            raise PipelineError(
                f"micro-batch {index}'s loss is not the output of one mean-reduced loss call, while the first"
                " micro-batch's was: lightning-mp cannot weigh it by its token count. Compute the loss the same way"
                " for every batch, or pass ModelParallel(loss_normalization='samples')."
            )
        self.calls[index] = call
        return call.as_sum() * (self.loss_scale / self._ref)

    def batch_loss(self, outputs: list[Any]) -> Tensor | None:
        """The whole batch's loss (detached), from the micro-batches' step outputs."""
        if self.by_tokens and len(self.calls) == len(outputs):
            total = sum(c.as_sum().detach() for c in self.calls.values())
            return total / self.count().to(total.dtype)
        losses = [step_loss(o, strict=False) for o in outputs]
        if any(v is None for v in losses):
            return None
        return sum(w * v.detach() for w, v in zip(self.sample_weights, losses))  # type: ignore[union-attr]

    def count(self) -> Tensor:
        return sum(c.count for c in self.calls.values())  # type: ignore[return-value]

    def normalizer(self) -> tuple[float, float] | None:
        """(ref, ΣN) when the step was weighed by tokens: its gradients are to be scaled by ``ref / ΣN``."""
        if not self.by_tokens or self._ref is None:
            return None
        return float(self._ref), float(self.count())


def _why_unrecognised(recorder: MeanLossRecorder | None) -> str:
    if recorder is None or not recorder.calls:
        return "the step computes no mean-reduced loss that lightning-mp recognises"
    return (
        f"the step's loss is not itself the output of one of the {len(recorder.calls)} mean-reduced loss calls it"
        " made (e.g. it adds a second term, or rescales it)"
    )

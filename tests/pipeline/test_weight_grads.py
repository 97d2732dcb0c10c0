"""Deferred weight gradients (schedule="zero_bubble"): the same gradients as autograd's, computed later."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mp.pipeline.weight_grads import DeferredWeightGrads


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 4))
    net[2].weight.requires_grad_(False)  # a frozen layer is left to autograd
    return net


def test_deferred_gradients_equal_autograds() -> None:
    x = torch.randn(3, 5, 8)
    reference = _net()
    reference(x).square().mean().backward()
    net = _net()
    deferred = DeferredWeightGrads()
    deferred.install([net])
    deferred.enabled = True
    for microbatch, chunk in enumerate(x.split(2)):  # two micro-batches, summed as gradient accumulation does
        deferred.microbatch = microbatch
        # saved-tensor hooks (as the executor's memory accounting uses) hand back aliases of saved tensors
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = net(chunk).square().sum() / x[..., 0].numel() / 4
        loss.backward()
    assert net[0].weight.grad is None and net[3].weight.grad is not None  # linear: queued; layer norm: at once
    assert list(deferred.pending) == [0, 1] and len(deferred.pending[0]) == 2  # first and last linear layers
    while deferred.has_pending():
        deferred.run_one()
    for (name, a), b in zip(reference.named_parameters(), net.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_off_it_is_plain_linear() -> None:
    net = _net()
    deferred = DeferredWeightGrads()
    deferred.install([net])
    net(torch.randn(2, 8)).sum().backward()
    assert not deferred.has_pending() and net[0].weight.grad is not None
    assert isinstance(net[0], nn.Linear) and type(net[0]).__name__ == "Linear"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_it_defers_the_gradients_autocast_computes(dtype: torch.dtype) -> None:
    """zero_bubble under mixed precision: the products run in the autocast dtype, as autocast runs them, and the
    fp32 parameters receive the same gradients (the same kernels, so the same bits)."""
    x = torch.randn(3, 5, 8)
    reference = _net()
    with torch.autocast("cpu", dtype=dtype):
        out = reference(x)
    out.float().square().mean().backward()
    net = _net()
    deferred = DeferredWeightGrads()
    deferred.install([net])
    deferred.enabled, deferred.microbatch = True, 0
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert net[0].weight.grad is None and list(deferred.pending) == [0]
    while deferred.has_pending():
        deferred.run_one()
    for (name, a), b in zip(reference.named_parameters(), net.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert b.grad.dtype == a.grad.dtype == torch.float32, name
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), (name, (a.grad - b.grad).abs().max())


def test_auto_picks_zero_bubble_where_linear_weights_can_wait() -> None:
    from lightning_mp.plan.build import choose_schedule
    from tests.models import make_model

    assert choose_schedule(make_model("gpt")) == "zero_bubble"  # nn.Linear MLPs
    assert choose_schedule(make_model("hf_llama")) == "zero_bubble"
    assert choose_schedule(make_model("hf_gpt2")) == "1f1b"  # Conv1D projections: nothing to defer

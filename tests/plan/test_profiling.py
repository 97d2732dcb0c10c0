"""Measured layer costs and the time/memory balances built on them (one process, no distribution)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_mp.pipeline.measure import measure_step_costs
from lightning_mp.plan.build import build_plan
from lightning_mp.plan.cost_model import PlanPrediction, StageCostModel, in_flight
from lightning_mp.plan.profiling import LayerCosts


class HeavyHead(L.LightningModule):
    """Eight cheap layers and an LM-like head that costs more than all of them together."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32)) for _ in range(8)])
        self.head = nn.Linear(32, 8192)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.layers(x)), y)
        self.log("train_loss", loss)
        return loss


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 32, generator=g), torch.randint(0, 8192, (64,), generator=g)


def test_time_balance_moves_layers_off_a_heavy_last_stage() -> None:
    torch.set_num_threads(1)
    model = HeavyHead()
    plan = build_plan(model, 2, "time", measure=measure_step_costs(model, "training_step", _batch(), 2, True))
    assert plan.balance[0] > plan.balance[1]
    assert plan.prediction is not None and plan.prediction.stage_time[1] > 0
    assert "predicted:" in plan.format() and "ms/micro-batch" in plan.format()


def test_profiling_leaves_the_model_as_it_was() -> None:
    model = HeavyHead()
    rng = torch.get_rng_state()
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    measure_step_costs(model, "training_step", _batch(), 2, True)(build_plan(model, 2).layers)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))


def test_activation_bytes_are_counted_per_layer() -> None:
    model = HeavyHead()
    costs = measure_step_costs(model, "training_step", _batch(), 1, True)(build_plan(model, 2).layers)
    assert len(costs.layer_activation_bytes) == 8
    assert all(b > 0 for b in costs.layer_activation_bytes)
    assert costs.post_activation_bytes > costs.layer_activation_bytes[0]  # the head's logits


def _model(schedule: str) -> StageCostModel:
    costs = LayerCosts([1.0] * 4, 0.5, 2.0, [100] * 4, 10, 400)
    return StageCostModel(costs, [1000] * 4, 5000, 0, 2, schedule, 8)


def test_cost_model_accounts_for_the_schedule() -> None:
    assert [in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert in_flight("gpipe", 3, 4, 8) == 8 and in_flight("none", 0, 4, 8) == 1
    assert _model("gpipe").memory(0, 0, 2) > _model("1f1b").memory(0, 0, 2)
    assert _model("1f1b").time(1, 2, 4) == pytest.approx(4.0)


def test_prediction_bubble_and_imbalance() -> None:
    pred = PlanPrediction.of(_model("1f1b"), [2, 2])
    assert pred.stage_time == pytest.approx([2.5, 4.0])
    assert pred.step_time == pytest.approx(6.5 + 7 * 4.0)
    assert pred.imbalance == pytest.approx(4.0 / 3.25)
    assert 0 < pred.bubble < 1


def test_dry_run_reports_ranks_and_leaves_the_model_whole() -> None:
    import lightning_mp
    from lightning_mp.pipeline.stage import RemoteLayer

    model = HeavyHead()
    plan, report = lightning_mp.dry_run(model, _batch(), devices=4, pipeline_parallel_size=4, balance="time")
    assert [s["ranks"] for s in report["stages"]] == [[0], [1], [2], [3]]
    assert report["balance"] == plan.balance and len(plan.balance) == 4
    assert 0 <= report["predicted_bubble"] < 1 and report["imbalance"] >= 1
    assert not any(isinstance(m, RemoteLayer) for m in model.modules())


def test_memory_limit_steers_the_split_or_reports_the_stages_needed() -> None:
    model = _model("gpipe")  # stage 0 also holds 5000 parameter bytes of embeddings
    loose = model.function("time", max_memory=1e9)
    assert loose(0, 0, 2) == model.time(0, 0, 2)
    tight = model.function("time", max_memory=model.memory(1, 2, 4) + 1)
    assert tight(0, 0, 2) == float("inf") and tight(1, 2, 4) < float("inf")


def test_plan_over_the_memory_limit_names_the_stages_that_fit() -> None:
    from lightning_mp import ModelSplitError

    torch.set_num_threads(1)
    model = HeavyHead()
    measure = measure_step_costs(model, "training_step", _batch(), 2, True)
    plan = build_plan(model, 2, "time", measure=measure)
    need = max(plan.prediction.stage_memory)
    with pytest.raises(ModelSplitError, match=r"over max_memory=.*(at least pipeline_parallel_size=\d+|no split)"):
        build_plan(model, 2, "time", measure=measure, max_memory=need * 0.3)


def test_stage_time_counts_its_boundary_messages() -> None:
    from lightning_mp.plan.cost_model import COMM_SECONDS_PER_BYTE

    costs = LayerCosts([1.0] * 4, 0.0, 0.0, [0] * 4, 0, 0, layer_output_bytes=[2**20] * 4)
    model = StageCostModel(costs, [0] * 4, 0, 0, 2, "1f1b", 4)
    message = 2 * COMM_SECONDS_PER_BYTE * 2**20  # activation one way, its gradient back
    assert model.time(0, 0, 2) == pytest.approx(2.0 + message)
    assert model.time(1, 2, 4) == pytest.approx(2.0 + message)
    net = HeavyHead()
    measured = measure_step_costs(net, "training_step", _batch(), 2, True)(build_plan(net, 2).layers)
    assert measured.layer_output_bytes == [32 * 32 * 4] * 8  # a micro-batch of 32 samples × 32 features, fp32


def test_a_model_on_the_meta_device_is_planned_without_memory() -> None:
    """A model too large for one process is planned from shapes: memory as on real weights, time from FLOPs."""
    import lightning_mp

    torch.set_num_threads(1)
    real = HeavyHead()
    with torch.device("meta"):
        meta = HeavyHead()
    for balance in ("memory", "time"):
        on_meta, _ = lightning_mp.dry_run(meta, _batch(), pipeline_parallel_size=2, balance=balance, microbatches=2)
        on_cpu, _ = lightning_mp.dry_run(real, _batch(), pipeline_parallel_size=2, balance=balance, microbatches=2)
        assert on_meta.balance == on_cpu.balance == [7, 1]  # the head outweighs the seven layers in FLOPs and bytes
        assert on_meta.prediction.stage_memory == pytest.approx(on_cpu.prediction.stage_memory, rel=0.01)
    assert all(p.is_meta for p in meta.parameters())


def test_a_hugging_face_model_on_meta_reads_its_mask_and_is_planned() -> None:
    """GPT-2 asks whether its attention mask is all ones (``.item()`` on a meta tensor): planning still works."""
    from tests.models import TokenData, make_model

    data = TokenData(8, 8)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.device("meta"):
        meta = make_model("hf_gpt2")
    real = make_model("hf_gpt2")
    plans = [
        build_plan(m, 2, "memory", measure=measure_step_costs(m, "training_step", batch, 2, True)) for m in (meta, real)
    ]
    assert plans[0].balance == plans[1].balance
    assert plans[0].prediction.stage_memory == pytest.approx(plans[1].prediction.stage_memory, rel=0.02)
    assert all(t > 0 for t in plans[0].prediction.stage_time)


def test_layers_are_measured_one_at_a_time_on_the_run_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the whole model is still on the CPU at set-up: the step runs there once and each layer is then timed
    alone on the run's device, never the whole model there (here the device "cpu:0" stands for it). Its activation
    and output bytes are those of the whole-step profile, and the model ends as it was."""
    model = HeavyHead()
    layers = build_plan(model, 2).layers
    target = torch.device("cpu", 0)
    moves: list[tuple[str, torch.device]] = []
    names = {id(m): n for n, m in model.named_modules()}
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        moves.append((names.get(id(self), "?"), torch.device(args[0] if args else kwargs["device"])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    rng = torch.get_rng_state()
    whole = measure_step_costs(model, "training_step", _batch(), 2, True)(layers)
    assert not moves
    alone = measure_step_costs(model, "training_step", _batch(), 2, True, on=target)(layers)
    assert [device for _, device in moves] == [target, torch.device("cpu")] * layers.num_layers  # there and back
    assert [name for name, _ in moves[::2]] == [f"layers.{i}" for i in range(layers.num_layers)]  # one by one
    assert alone.layer_activation_bytes == whole.layer_activation_bytes
    assert alone.layer_output_bytes == whole.layer_output_bytes
    assert all(t > 0 for t in alone.layer_time) and alone.post_time > 0
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in model.named_parameters())
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after)) and torch.equal(torch.get_rng_state(), rng)

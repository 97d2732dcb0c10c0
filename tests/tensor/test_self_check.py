"""The tensor-parallel self-check: what it checks, how it judges, and that a wrong plan never trains."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_mp.plan.discovery import discover_layers
from lightning_mp.runtime.errors import ModelSplitError
from lightning_mp.tensor.plan import TensorParallelPlan, plan_tensor_parallel
from lightning_mp.tensor.self_check import (
    Target,
    Verdict,
    _excess,
    keep_whole,
    mismatch_message,
    plan_targets,
    restrict,
)
from tests.conftest import assert_matches_reference, load_result, run_harness, run_jobs_or_fail
from tests.models import make_model

SWAPPED = {"blocks.*.mlp.0": "rowwise", "blocks.*.mlp.2": "colwise"}  # the MLP's styles the wrong way round
CONTIGUOUS = {"blocks.*.mlp.Wi": "colwise", "blocks.*.mlp.Wo": "rowwise"}  # gate/up fused, split as one part
KW = {"batch_size": 6, "n": 20}
TP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "microbatches": 2}


def _plan(model: str, user: dict[str, str] | None = None) -> tuple[nn.Module, TensorParallelPlan]:
    module = make_model(model)
    return module, plan_tensor_parallel(module, discover_layers(module).container_name, 2, user)


# ---- one process ----------------------------------------------------------------------------------------------


def test_one_check_per_distinct_block_and_for_the_embedding_and_head() -> None:
    module, plan = _plan("hf_llama")
    targets = plan_targets(module, plan)
    assert [t.members for t in targets] == [
        ["model.model.layers.0"], ["model.model.embed_tokens"], ["model.lm_head"]
    ]  # fmt: skip
    assert [run[0] for run in targets[0].covers] == [f"model.model.layers.{i}" for i in range(4)]
    block = restrict(plan, "model.model.layers.1")
    assert block.styles["self_attn.o_proj"] == "rowwise" and "model.lm_head" not in block.styles
    assert restrict(plan, "model.lm_head").styles == {"": "head"}


def test_a_block_whose_column_split_leaves_it_is_checked_with_its_partner() -> None:
    user = {"net.0.0": "colwise", "net.1.0": "rowwise", "net.2.0": "colwise", "net.3.0": "rowwise"}
    module, plan = _plan("sequential", user)
    (target,) = plan_targets(module, plan)
    assert target.members == ["net.0", "net.1"] and target.covers == [["net.0", "net.1"], ["net.2", "net.3"]]


def test_differences_are_judged_relative_to_the_magnitude() -> None:
    want = torch.full((4,), 1000.0)
    assert _excess(want + 0.05, want)[0] < 1  # 5e-5 of the magnitude
    assert _excess(want + 0.5, want)[0] > 1
    assert _excess(None, torch.zeros(3)) == (0.0, 0.0, 0.0)  # no gradient is a zero gradient
    assert _excess(torch.zeros(2), torch.zeros(3))[0] == float("inf")


def test_the_refusal_names_the_module_the_rule_the_difference_and_the_fix() -> None:
    module, plan = _plan("gpt", SWAPPED)
    target = plan_targets(module, plan)[0]
    text = mismatch_message(plan, Verdict(target, "output", 250.0, 0.031, 1.2))
    assert "blocks.0 (Block)" in text and "mlp.0 rowwise, mlp.2 colwise" in text and "user + automatic" in text
    assert "0.031" in text and "tensor_parallel_plan={'blocks.*': 'replicate'}" in text


def test_fallback_keeps_every_block_of_the_class_whole() -> None:
    module, plan = _plan("hf_gpt2")
    block = plan_targets(module, plan)[0]
    keep_whole(plan, Verdict(block, "output", 9.0))
    assert not [n for n in plan.styles if ".h." in n] and not [n for n in plan.attributes if ".h." in n]
    assert plan.styles == {"model.transformer.wte": "vocab", "model.lm_head": "head"}
    assert "self-check" in plan.replicated["model.transformer.h.3.mlp.c_fc"]
    head = Target(["model.lm_head"], [["model.lm_head"]], "")
    keep_whole(plan, Verdict(head, "output", 9.0))  # the head is tied to the embedding: both stay whole
    assert plan.styles == {}


def test_the_option_is_checked() -> None:
    from lightning_mp.options import StrategyOptions
    from lightning_mp.runtime.errors import ConfigError

    assert StrategyOptions(tensor_parallel_check="fallback").tensor_parallel_check == "fallback"
    with pytest.raises(
        ConfigError, match=r"tensor_parallel_check='warn' is invalid: allowed: error \| fallback \| off"
    ):
        StrategyOptions(tensor_parallel_check="warn")


# ---- two processes, the check called directly -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_worker(rank: int, port: int, cases: list[tuple[str, Any, str]], out: str) -> None:
    """Plan and self-check each (model, user plan, mode) at tp=2 on the model's first batch; rank 0 saves what
    happened: the report line and the partial gradients, or the refusal."""
    from lightning_mp.tensor.self_check import self_check
    from lightning_mp.tensor.shard import TPGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name, user, mode in cases:
        key = f"{name}{'+plan' if user else ''}/{mode}"
        try:
            module, plan = _plan(name, user)
            batch = next(iter(module.train_dataloader()))
            tp = TPGroup(dist.group.WORLD, rank, 2)
            step = lambda m=module, b=batch: m.training_step(b, 0)  # noqa: E731
            report = self_check(module, plan, tp, step, mode, torch.device("cpu"))
            results[key] = {"report": report, "plan": plan}
        except ModelSplitError as err:
            results[key] = {"error": str(err)}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def check_at_tp2(tmp_path: Path, cases: list[tuple[str, Any, str]]) -> dict[str, Any]:
    """Run :func:`_check_worker` on two processes; what rank 0 saw, by "model/mode" ("model+plan/mode" with a
    user plan)."""
    out = str(tmp_path / "checks.pt")
    mp.spawn(_check_worker, args=(_free_port(), cases, out), nprocs=2)
    return torch.load(out, weights_only=False)  # type: ignore[no-any-return]


@pytest.mark.distributed
def test_wrong_plans_are_refused_right_ones_pass_and_per_head_norms_are_summed(tmp_path: Path) -> None:
    got = check_at_tp2(tmp_path, [
        ("gpt", SWAPPED, "error"),
        ("fused_wi", CONTIGUOUS, "error"),  # gate and up fused, split by chunk(2): split contiguously, silently wrong
        ("fused_wi", None, "error"),  # the data flow finds the chunk(2) layout
        ("hf_llama", None, "error"),
        ("hf_qwen3", None, "error"),
        ("fused_wi", CONTIGUOUS, "fallback"),
    ])  # fmt: skip
    wrong = got["gpt+plan/error"]["error"]
    assert "blocks.0 (Block)" in wrong and "fails when split" in wrong
    assert "tensor_parallel_plan={'blocks.*': 'replicate'}" in wrong
    fused = got["fused_wi+plan/error"]["error"]
    assert "blocks.0 (MLPBlock), split by the user + automatic plan (mlp.Wi colwise, mlp.Wo rowwise)" in fused
    assert "computes a different output split than whole" in fused and "silently wrong" in fused
    assert all(v.ok for v in got["fused_wi/error"]["report"].verdicts)
    assert "data flow: 1 of 1 distinct blocks" in got["fused_wi/error"]["plan"].format()
    llama = got["hf_llama/error"]["report"]
    assert len(llama.verdicts) == 3 and all(v.ok for v in llama.verdicts) and llama.seconds < 10
    assert "self-check: 3 split modules match whole" in got["hf_llama/error"]["plan"].format()
    qwen3 = got["hf_qwen3/error"]["plan"]
    assert "model.model.layers.2.self_attn.q_norm.weight" in qwen3.partial
    assert "model.model.layers.2.self_attn.k_norm.weight" in qwen3.partial and len(qwen3.partial) == 8
    fallback = got["fused_wi+plan/fallback"]["plan"]
    assert set(fallback.styles.values()) == {"vocab", "head"}  # the blocks stay whole, the rest is split


# ---- end to end: the strategy refuses before the first step --------------------------------------------------


@pytest.mark.distributed
def test_a_wrong_user_plan_never_trains(tmp_path: Path) -> None:
    proc = run_harness([{"name": "wrong", "model": "gpt", "model_kwargs": KW, "devices": 2,
                         "strategy": {**TP2, "tensor_parallel_plan": SWAPPED}}], tmp_path)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ModelSplitError: tensor-parallel self-check: blocks.0 (Block)" in output
    assert not (tmp_path / "wrong").exists()  # no rank finished training


@pytest.mark.distributed
def test_fallback_trains_right_with_the_wrong_blocks_whole(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = run_jobs_or_fail(tmp_path_factory, "fallback", [
        {"name": "ref", "model": "fused_wi", "model_kwargs": KW},
        {"name": "tp2", "model": "fused_wi", "model_kwargs": KW, "devices": 2,
         "strategy": {**TP2, "tensor_parallel_check": "fallback", "tensor_parallel_plan": CONTIGUOUS}},
    ])  # fmt: skip
    for rank in range(2):
        assert_matches_reference(load_result(out, "ref", 0), load_result(out, "tp2", rank))

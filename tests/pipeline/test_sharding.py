"""Sharded data parallelism (ZeRO levels) with a pipeline: the same numbers as one process at every level, 1/dp of
the optimizer state per rank, and checkpoints that resume at another level and dp size."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mp.checkpoint.distributed import load_full_checkpoint
from lightning_mp.checkpoint.dp_shards import flat_range_pieces
from lightning_mp.options import StrategyOptions
from lightning_mp.pipeline.buckets import build_buckets
from lightning_mp.pipeline.sharding import SHARDING_LEVELS, sharded_bytes
from lightning_mp.runtime.errors import ConfigError
from tests.conftest import ROOT, assert_matches_reference, load_result, run_harness, run_script

LEVELS = list(SHARDING_LEVELS)
KW = {"batch_size": 4, "n": 32, "lengths": [8]}  # one epoch = 4 steps per replica
DP2PP2 = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "data_parallel_bucket_size": 8192}
CLIP = {"gradient_clip_val": 0.05}
# even micro-batches (2 + 2: buckets launch during the backward) for two levels, uneven (2 + 1 + 1: the token-mean
# scale is known only after the step, buckets launch again) for the others
MICROBATCHES = {"none": 2, "optimizer": 3, "gradients": 3, "full": 2}
STEP2 = "adam-optimizer/ckpts/step=2.ckpt"  # saved at ZeRO-1


# ---- units --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (4, 1, 3)])
def test_flat_runs_become_rectangular_pieces_covering_them_in_order(shape: tuple[int, ...]) -> None:
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    n = full.numel()
    for start in range(n):
        for end in range(start + 1, n + 1):
            got = []
            for offsets, sizes in flat_range_pieces(shape, start, end):
                index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
                got += full[index].reshape(-1).tolist()
            assert got == list(range(start, end)), (start, end)


def test_buckets_keep_groups_apart_pad_to_the_replicas_and_put_late_parameters_last() -> None:
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (5, 7, 3))
    buckets = build_buckets([[("a", a), ("b", b)], [("c", c)]], world=4, late={id(a)}, cap_bytes=1 << 20)
    assert [bk.names for bk in buckets] == [["b"], ["c"], ["a"]]
    assert [bk.numel for bk in buckets] == [8, 4, 8] and buckets[-1].late
    small = build_buckets([[("a", a), ("b", b), ("c", c)]], world=2, late=set(), cap_bytes=40)
    assert [bk.names for bk in small] == [["c", "b"], ["a"]]  # reverse order, at most 40 bytes (one larger alone)


def test_predicted_bytes_per_rank_at_each_level() -> None:
    got = {level: sharded_bytes(1000, 4, level) for level in LEVELS}
    assert got["none"] == {"parameters": 1000, "gradients": 1000, "optimizer": 2000}
    assert got["optimizer"] == {"parameters": 1000, "gradients": 1000, "optimizer": 500}
    assert got["gradients"] == {"parameters": 1000, "gradients": 250, "optimizer": 500}
    assert got["full"] == {"parameters": 250, "gradients": 250, "optimizer": 500}


def test_a_bad_level_names_the_setting_and_the_choices() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("data_parallel_sharding='zero3' is invalid: allowed: none | optimizer")
    ):
        StrategyOptions(data_parallel_sharding="zero3")
    with pytest.raises(ConfigError, match="rebalance=True does not move sharded optimizer state"):
        StrategyOptions(data_parallel_sharding="full", rebalance=True)


# ---- training -----------------------------------------------------------------------------------------------------


def _jobs() -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = [
        {
            "name": "ref-union",
            "model": "gpt",
            "model_kwargs": {**KW, "batch_size": 8},
            "trainer": CLIP,
            "replica_order": {"replicas": 2, "batch_size": 4},
        }
    ]
    for level in LEVELS:
        strategy = {**DP2PP2, "microbatches": MICROBATCHES[level], "data_parallel_sharding": level}
        jobs.append({"name": f"dp2pp2-{level}", "model": "gpt", "model_kwargs": KW, "devices": 4, "trainer": CLIP,
                     "strategy": strategy})  # fmt: skip
    adam = {**KW, "n": 16, "optimizer": "adamw", "lr": 0.01}  # 2 steps per epoch: step 2 ends one
    for level in ("none", "optimizer"):
        jobs.append(
            {
                "name": f"adam-{level}",
                "model": "gpt",
                "model_kwargs": adam,
                "devices": 4,
                "max_steps": 4,
                "checkpoint_every": 2,
                "strategy": {**DP2PP2, "microbatches": 2, "data_parallel_sharding": level},
            }
        )
    # the ZeRO-1 checkpoint resumed at ZeRO-3
    jobs.append(
        {
            "name": "adam-full",
            "model": "gpt",
            "model_kwargs": adam,
            "devices": 4,
            "max_steps": 4,
            "resume_from": STEP2,
            "strategy": {**DP2PP2, "microbatches": 2, "data_parallel_sharding": "full"},
        }
    )
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharding")
    spec = out / "jobs.json"
    spec.write_text(json.dumps(_jobs()))
    proc = run_script([str(ROOT / "tests" / "pipeline" / "sharding_harness.py"), str(spec), str(out)], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _replica_mean(results: list[dict[str, Any]], start: int = 0, ranks: tuple[int, ...] = (0, 2)) -> list[float]:
    """Each replica reports its own shard's loss (as DDP does): their mean is the one-process loss (equal token
    counts). ``ranks``: one rank of each replica (dp2×pp2: 0 and 2)."""
    return [sum(v) / len(ranks) for v in zip(*(results[r]["losses"][start:] for r in ranks))]


def _memory(out: Path, job: str, rank: int) -> dict[str, int]:
    return json.loads((out / job / f"memory{rank}.json").read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("level", LEVELS)
def test_each_level_trains_to_the_numbers_of_one_process(runs: Path, level: str) -> None:
    ref = load_result(runs, "ref-union", 0)
    results = [load_result(runs, f"dp2pp2-{level}", r) for r in range(4)]
    for got in results:
        assert_matches_reference(ref, {**got, "losses": _replica_mean(results)})


@pytest.mark.distributed
def test_buckets_launch_during_the_backward_and_again_when_the_scale_came_late(runs: Path) -> None:
    for level in LEVELS:
        memory = [_memory(runs, f"dp2pp2-{level}", r) for r in range(4)]
        assert all(m["buckets"] > 1 for m in memory)
        early = sum(m["launched_early"] for m in memory)
        assert early > 0, level  # from the second step on
        relaunched = sum(m["relaunched"] for m in memory)
        # 2 even micro-batches: the scale is 1, nothing to redo; 3 uneven ones: every early launch is redone
        assert (relaunched == 0) if MICROBATCHES[level] == 2 else (relaunched == early), level


@pytest.mark.distributed
def test_each_rank_keeps_its_share_of_the_optimizer_state(runs: Path) -> None:
    full_state = {r: _memory(runs, "dp2pp2-none", r)["optimizer"] for r in range(4)}
    for level in ("optimizer", "gradients", "full"):
        for rank in range(4):
            got = _memory(runs, f"dp2pp2-{level}", rank)
            # one momentum buffer: half of the stage's, within the padding to the replicas (a few elements)
            assert abs(got["optimizer"] - full_state[rank] / 2) <= 64, (level, rank, got, full_state[rank])
    stage_bytes = _memory(runs, "dp2pp2-none", 0)["parameters"]
    assert _memory(runs, "dp2pp2-full", 0)["parameters"] <= stage_bytes / 2 + 64  # only its shard between steps
    assert _memory(runs, "dp2pp2-gradients", 0)["gradients"] <= stage_bytes / 2 + 64


@pytest.mark.distributed
def test_adamw_state_resumes_at_another_level(runs: Path) -> None:
    straight = [load_result(runs, "adam-optimizer", r) for r in range(4)]
    resumed = [load_result(runs, "adam-full", r) for r in range(4)]
    for rank in range(4):
        ref = {"losses": _replica_mean(straight, start=2), "params": straight[rank]["params"]}
        assert_matches_reference(ref, {**resumed[rank], "losses": _replica_mean(resumed)})


@pytest.mark.distributed
def test_a_sharded_checkpoint_holds_the_full_tensors_of_a_replicated_one(runs: Path) -> None:
    # read in one process: every model and optimizer tensor whole, under the model's names, as "none" saves them
    replicated = load_full_checkpoint(runs / "adam-none/ckpts/step=2.ckpt")
    sharded = load_full_checkpoint(runs / STEP2)
    for key in ("state_dict",):
        assert set(sharded[key]) == set(replicated[key])
        for name, value in replicated[key].items():
            assert torch.allclose(sharded[key][name], value, atol=1e-6), name
    (got,), (want,) = sharded["optimizer_states"], replicated["optimizer_states"]
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"])
    for index, state in want["state"].items():
        for key, value in state.items():
            assert torch.allclose(got["state"][index][key], value, atol=1e-6, rtol=1e-4), (index, key)


# ---- resuming at another dp size and level ---------------------------------------------------------------------------
# Checkpoints saved after the first epoch (2 steps) of a sharded run, resumed at another dp size and level for the
# second epoch, against one process fed the replicas' data straight through (tests/harness.py's replica order, each
# epoch in its own order). SGD with momentum, the GPT: dp2×pp2 at "full" -> dp1×pp2 and one process. AdamW, the MLP
# (the GPT's key biases have a zero gradient, whose rounding noise Adam scales up to the learning rate): dp4 at
# "full" -> dp2 at "optimizer", whose shards cut every tensor elsewhere; a dp2 replica's batch of 8 is the samples two
# dp4 replicas' batches of 4 held, so each step sees the same samples.
SGD_KW = {"batch_size": 4, "n": 16, "lengths": [8]}  # dp2: 2 steps per epoch
ADAM_KW = {"batch_size": 4, "n": 32, "optimizer": "adamw", "lr": 0.01}  # dp4: 2 steps per epoch
DP4 = {"pipeline_parallel_size": 1, "data_parallel_size": 4, "data_parallel_bucket_size": 2048}  # 3 buckets


def _resume_jobs() -> list[list[dict[str, Any]]]:
    """Two harness runs: the saving runs and references (the 4 ranks launched once), then the resumed runs (the
    ranks of one harness run serve all its jobs, so a smaller world needs a run of its own)."""
    common = {"model": "gpt", "max_steps": 4}
    sgd = {**common, "model_kwargs": SGD_KW}
    union2 = {"replicas": 2, "batch_size": 4}
    adam = {"model": "sequential", "max_steps": 4, "model_kwargs": ADAM_KW}
    union4 = {"replicas": 4, "batch_size": 4}
    saving = [
        {"name": "sgd-ref", **sgd, "replica_order": union2, "save_to": "sgd-ref.ckpt"},
        {
            "name": "sgd-full",
            **sgd,
            "devices": 4,
            "checkpoint_every": 2,
            "strategy": {**DP2PP2, "microbatches": 2, "data_parallel_sharding": "full"},
        },
        {"name": "adam-ref", **adam, "replica_order": union4, "save_to": "adam-ref.ckpt"},
        {
            "name": "adam-dp4",
            **adam,
            "devices": 4,
            "checkpoint_every": 2,
            "strategy": {**DP4, "data_parallel_sharding": "full"},
        },
    ]
    resumed = [
        {"name": "sgd-pp2", **sgd, "devices": 2, "replica_order": union2, "resume_from": "sgd-full/ckpts/step=2.ckpt",
         "strategy": {"pipeline_parallel_size": 2, "microbatches": 2}, "save_to": "sgd-pp2.ckpt"},
        {"name": "sgd-one", **sgd, "replica_order": union2, "resume_from": "sgd-full/ckpts/step=2.ckpt",
         "checkpoint_io": "distributed", "save_to": "sgd-one.ckpt"},
        {"name": "adam-dp2", **adam, "model_kwargs": {**ADAM_KW, "batch_size": 8}, "devices": 2,
         "resume_from": "adam-dp4/ckpts/step=2.ckpt", "save_to": "adam-dp2.ckpt",
         "strategy": {**DP4, "data_parallel_size": 2, "data_parallel_sharding": "optimizer"}},
    ]  # fmt: skip
    return [saving, resumed]


@pytest.fixture(scope="module")
def resumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp-resume")
    for jobs in _resume_jobs():
        proc = run_harness(jobs, out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _optimizer_state(path: Path) -> dict[Any, dict[str, torch.Tensor]]:
    """The optimizer state of a checkpoint (a directory, or one process's file), numbered as torch.optim does."""
    checkpoint = load_full_checkpoint(path) if path.is_dir() else torch.load(path, weights_only=False)
    (optimizer,) = checkpoint["optimizer_states"]
    return optimizer["state"]


def _assert_same_optimizer_state(want: dict[Any, dict[str, Any]], got: dict[Any, dict[str, Any]]) -> None:
    assert set(got) == set(want) and want
    for index, state in want.items():
        assert set(got[index]) == set(state), index
        for key, value in state.items():
            torch.testing.assert_close(got[index][key], value, atol=1e-5, rtol=1e-5, msg=f"{index}/{key}")


@pytest.mark.distributed
def test_a_full_dp2_checkpoint_resumes_at_dp1_and_in_one_process_to_the_numbers_straight_through(
    resumes: Path,
) -> None:
    ref = load_result(resumes, "sgd-ref", 0)
    straight = [load_result(resumes, "sgd-full", r) for r in range(4)]
    for got in straight:  # the reference is what dp2 trains over both epochs
        assert_matches_reference(ref, {**got, "losses": _replica_mean(straight)})
    second = {**ref, "losses": ref["losses"][2:]}
    resumed = [load_result(resumes, "sgd-pp2", r) for r in range(2)] + [load_result(resumes, "sgd-one", 0)]
    for got in resumed:
        assert_matches_reference(second, got)
    want = _optimizer_state(resumes / "sgd-ref.ckpt")  # momentum buffers
    for job in ("sgd-pp2", "sgd-one"):
        _assert_same_optimizer_state(want, _optimizer_state(resumes / f"{job}.ckpt"))


@pytest.mark.distributed
def test_adamw_state_sharded_over_4_resumes_sharded_over_2(resumes: Path) -> None:
    ref = load_result(resumes, "adam-ref", 0)
    straight = [load_result(resumes, "adam-dp4", r) for r in range(4)]
    for got in straight:
        assert_matches_reference(ref, {**got, "losses": _replica_mean(straight, ranks=(0, 1, 2, 3))})
    resumed = [load_result(resumes, "adam-dp2", r) for r in range(2)]
    second = {**ref, "losses": ref["losses"][2:]}
    for got in resumed:
        assert_matches_reference(second, {**got, "losses": _replica_mean(resumed, ranks=(0, 1))})
    # exp_avg, exp_avg_sq and step of every parameter, after the resumed epoch
    _assert_same_optimizer_state(
        _optimizer_state(resumes / "adam-ref.ckpt"), _optimizer_state(resumes / "adam-dp2.ckpt")
    )


def test_dry_run_shows_the_bytes_per_rank_of_the_chosen_level() -> None:
    import lightning_mp
    from tests.models import make_model

    model = make_model("gpt")
    reports = {
        level: lightning_mp.dry_run(model, devices=4, pipeline_parallel_size=2, data_parallel_sharding=level)[1]
        for level in ("none", "full")
    }
    none, full = (reports[level]["data_parallel"]["per_rank"] for level in ("none", "full"))
    for stage in range(2):
        assert full[stage]["optimizer"] * 2 == none[stage]["optimizer"]
        assert full[stage]["parameters"] * 2 == none[stage]["parameters"]
    assert "sharding=full" in reports["full"]["data_parallel"]["text"]

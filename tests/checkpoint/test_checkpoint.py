"""Distributed checkpoints in the model's own names: resume to the same numbers at any layout, consolidate for tools
without lightning-mp, survive a crash mid-save, and never run code from a checkpoint."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mp.checkpoint.consolidate import consolidate
from lightning_mp.checkpoint.distributed import CheckpointError, read_metadata, read_rest, save_checkpoint_dir
from tests.conftest import ROOT, assert_matches_reference, load_result, run_harness, run_jobs_or_fail, run_script
from tests.models import make_model

KW = {"batch_size": 6, "n": 12}
PP2 = {"pipeline_parallel_size": 2, "microbatches": 3}
STEP2 = "straight/ckpts/step=2.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    common = {"model": "gpt", "model_kwargs": KW, "max_steps": 4}
    jobs = [
        # ModelCheckpoint saves at steps 2 and 4; trainer.save_checkpoint after fit writes final.ckpt
        {"name": "straight", **common, "devices": 2, "strategy": PP2, "checkpoint_every": 2, "save_to": "final.ckpt"},
        {"name": "resumed", **common, "devices": 2, "strategy": PP2, "resume_from": STEP2},
        # one plain process (no lightning-mp strategy) resumes from the directory through the checkpoint IO plugin
        {"name": "one-process", **common, "resume_from": STEP2, "checkpoint_io": "distributed"},
    ]
    return run_jobs_or_fail(tmp_path_factory, "ckpt", jobs)


def _gpt_job(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "gpt", "model_kwargs": KW, "max_steps": 4, "devices": 2, "strategy": PP2, **extra}


def _after_step_2(run: dict) -> dict:
    return {**run, "losses": run["losses"][2:]}


@pytest.mark.distributed
def test_resume_continues_to_the_same_numbers(runs: Path) -> None:
    for rank in range(2):
        straight = load_result(runs, "straight", rank)
        assert_matches_reference(_after_step_2(straight), load_result(runs, "resumed", rank), atol=1e-6)


@pytest.mark.distributed
def test_each_rank_writes_its_own_stage(runs: Path) -> None:
    directory = runs / STEP2
    assert sorted(p.name for p in directory.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "lightning_state.pt",
    ]
    keys = set(read_metadata(directory).state_dict_metadata)
    assert "model/blocks.0.attn.in_proj_weight" in keys and "model/blocks.3.attn.in_proj_weight" in keys
    assert any(k.startswith("optim/0/blocks.3.") and k.endswith("/momentum_buffer") for k in keys)


@pytest.mark.distributed
def test_one_plain_process_resumes_from_the_directory(runs: Path) -> None:
    straight = {**load_result(runs, "straight", 0)["params"], **load_result(runs, "straight", 1)["params"]}
    one = load_result(runs, "one-process", 0)
    ref = _after_step_2(load_result(runs, "straight", 1))  # the last stage's losses are the model's
    assert_matches_reference({**ref, "params": straight}, one, atol=1e-6)


@pytest.mark.distributed
def test_a_pp2_checkpoint_resumes_at_pp4(runs: Path, tmp_path: Path) -> None:
    pp4 = {"pipeline_parallel_size": 4, "microbatches": 3}
    job = _gpt_job("pp4", devices=4, strategy=pp4, resume_from=str(runs / STEP2))
    proc = run_harness([job], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    straight = {**load_result(runs, "straight", 0)["params"], **load_result(runs, "straight", 1)["params"]}
    ref = _after_step_2(load_result(runs, "straight", 1))
    for rank in range(4):
        assert_matches_reference({**ref, "params": straight}, load_result(tmp_path, "pp4", rank), atol=1e-6)


@pytest.mark.distributed
def test_consolidated_file_loads_into_one_plain_process(runs: Path, tmp_path: Path) -> None:
    consolidate(runs / "final.ckpt", tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
    model = make_model("gpt", **KW)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every name of the unsplit model is there
    saved = {**load_result(runs, "straight", 0)["params"], **load_result(runs, "straight", 1)["params"]}
    params = dict(model.named_parameters())
    assert set(saved) == set(params)
    for name, value in saved.items():
        assert torch.equal(params[name].detach(), value), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])  # numbered in the one-process order


@pytest.mark.distributed
def test_hugging_face_export_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    job = {"name": "hf", "model": "hf_gpt2", "model_kwargs": KW, "max_steps": 2, "devices": 2, "strategy": PP2}
    proc = run_harness([{**job, "save_to": "hf.ckpt"}], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    cli = run_script(["-m", "lightning_mp.consolidate", str(tmp_path / "hf.ckpt"), "--hf", str(tmp_path / "hf")])
    assert cli.returncode == 0, cli.stderr[-3000:]
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    trained = {**load_result(tmp_path, "hf", 0)["params"], **load_result(tmp_path, "hf", 1)["params"]}
    params = dict(model.named_parameters())
    for name, value in trained.items():
        assert torch.equal(params[name.removeprefix("model.")].detach(), value), name


@pytest.mark.distributed
def test_a_crash_mid_save_leaves_the_last_good_checkpoint(runs: Path, tmp_path: Path) -> None:
    # rank 1 dies while the step-4 checkpoint is being written
    crash = _gpt_job("straight", checkpoint_every=2, crash_in_save={"rank": 1, "call": 2})
    proc = run_harness([crash], tmp_path)
    assert proc.returncode != 0
    ckpts = tmp_path / "straight" / "ckpts"
    assert (ckpts / "step=2.ckpt" / "lightning_state.pt").exists()
    assert not (ckpts / "step=4.ckpt").exists()  # only step=4.ckpt.partial, which nothing resumes from
    resume = _gpt_job("resumed", resume_from=STEP2)
    proc = run_harness([resume], tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # balance="time" measures this run afresh, so its split may differ from the straight run's: compare the whole model
    straight, resumed = _whole_model(runs, "straight"), _whole_model(tmp_path, "resumed")
    assert_matches_reference(_after_step_2(straight), resumed, atol=1e-6)


def _whole_model(out: Path, job: str) -> dict:
    """Rank 0's losses with every rank's parameters."""
    ranks = [load_result(out, job, rank) for rank in range(2)]
    return {**ranks[0], "params": {name: p for r in ranks for name, p in r["params"].items()}}


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo this must not run",))


def test_loading_never_runs_code_from_a_checkpoint(tmp_path: Path) -> None:
    model = make_model("sequential")
    path = tmp_path / "evil.ckpt"
    save_checkpoint_dir({"state_dict": model.state_dict(), "hyper_parameters": {"x": _RunsCode()}}, path, lambda o: [o])
    with pytest.raises(CheckpointError, match="checkpoint_weights_only=False"):
        read_rest(path)
    assert "hyper_parameters" in read_rest(path, weights_only=False)  # the user trusts it
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match=r"posix\.system, which is not checkpoint data"):
        read_metadata(path)


def test_an_interrupted_save_is_not_a_checkpoint(tmp_path: Path) -> None:
    partial = tmp_path / "step=4.ckpt.partial"
    partial.mkdir()
    with pytest.raises(CheckpointError, match="a save was interrupted"):
        read_rest(partial)


def test_consolidate_command_needs_an_output() -> None:
    proc = run_script(["-m", "lightning_mp.consolidate", str(ROOT)])
    assert proc.returncode != 0 and "give an output file, --hf DIR, or both" in proc.stderr

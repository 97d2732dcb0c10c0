"""Checkpoints speak the model's own names: resume to the same numbers, and load into one plain process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail
from tests.models import make_model

pytestmark = pytest.mark.distributed

KW = {"batch_size": 6, "n": 12}
PP2 = {"pipeline_parallel_size": 2, "microbatches": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    common = {"model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": PP2, "max_steps": 4}
    jobs = [
        # ModelCheckpoint saves at steps 2 and 4; trainer.save_checkpoint after fit writes final.ckpt
        {"name": "straight", **common, "checkpoint_every": 2, "save_to": "final.ckpt"},
        {"name": "resumed", **common, "resume_from": "straight/ckpts/step=2.ckpt"},
    ]
    return run_jobs_or_fail(tmp_path_factory, "ckpt", jobs)


def test_resume_continues_to_the_same_numbers(runs: Path) -> None:
    for rank in range(2):
        straight = load_result(runs, "straight", rank)
        resumed = load_result(runs, "resumed", rank)
        assert_matches_reference({**straight, "losses": straight["losses"][2:]}, resumed, atol=1e-6)


def test_checkpoint_loads_into_one_plain_process(runs: Path) -> None:
    checkpoint = torch.load(runs / "final.ckpt", weights_only=True)
    model = make_model("gpt", **KW)
    model.load_state_dict(checkpoint["state_dict"])  # strict: every name of the unsplit model is there
    saved = {**load_result(runs, "straight", 0)["params"], **load_result(runs, "straight", 1)["params"]}
    params = dict(model.named_parameters())
    assert set(saved) == set(params)
    for name, value in saved.items():
        assert torch.equal(params[name].detach(), value), name

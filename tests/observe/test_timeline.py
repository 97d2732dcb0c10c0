"""What a schedule does, seen and measured: the timeline of a step, the bubble beside its ideal, the activation
memory each schedule holds, and activation checkpointing (which must not change the numbers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_mp.observe import timeline
from lightning_mp.observe.stats import StepStats
from lightning_mp.observe.timeline import bubble_report, chrome_trace, ideal_bubble
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail

KW = {"batch_size": 8, "n": 32, "lengths": [8], "d": 64}


def test_ideal_bubble() -> None:
    assert ideal_bubble("1f1b", 2, 8) == pytest.approx(1 / 9)
    assert ideal_bubble("gpipe", 4, 4) == pytest.approx(3 / 7)
    assert ideal_bubble("none", 2, 8) == pytest.approx(1 / 2)


def test_chrome_trace_has_a_lane_per_stage() -> None:
    stages = [
        StepStats(busy=1.0, wall=2.0, spans=[("F", 0, 0.0, 0.5), ("B", 0, 1.0, 1.5)]),
        StepStats(busy=2.0, wall=2.0),
    ]
    trace = chrome_trace([stages])
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"]
    assert names == ["stage 0", "stage 1"]
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["tid"], e["dur"]) for e in spans] == [("F0", 0, 5e5), ("B0", 0, 5e5)]
    assert bubble_report([stages], "1f1b", 4)["bubble"] == pytest.approx(0.25)


@pytest.mark.parametrize("matplotlib", [True, False])
def test_the_timeline_says_which_files_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, matplotlib: bool
) -> None:
    if matplotlib:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    said: list[str] = []
    monkeypatch.setattr(timeline, "rank_zero_info", said.append)
    stages = [StepStats(busy=1.0, wall=2.0, spans=[("F", 0, 0.0, 0.5)]), StepStats(busy=1.0, wall=2.0)]
    runner = SimpleNamespace(timelines=[stages], schedule="1f1b", microbatches=2, chunks=1)
    trainer = SimpleNamespace(strategy=SimpleNamespace(runner=runner), global_rank=0, default_root_dir=tmp_path)
    timeline.PipelineTimeline(dirpath=tmp_path).on_train_end(trainer, None)  # type: ignore[arg-type]
    assert (tmp_path / "timeline.json").exists()
    assert (tmp_path / "timeline.png").exists() == matplotlib
    assert ("and timeline.png" in said[0]) == matplotlib
    assert ("no timeline.png: matplotlib is not installed" in said[0]) != matplotlib


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    jobs = [{"name": "ref", "model": "gpt", "model_kwargs": KW}]
    for schedule in ("gpipe", "1f1b"):
        strategy = {"pipeline_parallel_size": 2, "microbatches": 8, "schedule": schedule, "balance": "uniform"}
        jobs.append({"name": schedule, "model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": strategy})
    for mode in ("always", "except_last"):
        strategy = {"pipeline_parallel_size": 2, "microbatches": 8, "activation_checkpointing": mode}
        jobs.append({"name": f"ckpt-{mode}", "model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": strategy})
    every2 = {"pipeline_parallel_size": 2, "microbatches": 8, "activation_checkpointing": "always"}
    every2["checkpoint_every_n_layers"] = 2  # stage 0 runs blocks 0 and 1: block 0 recomputed, block 1 kept
    jobs.append({"name": "ckpt-every2", "model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": every2})
    jobs[2]["timeline"] = True
    zbv = {"pipeline_parallel_size": 2, "microbatches": 8, "schedule": "zero_bubble_v", "balance": "uniform"}
    jobs.append({"name": "zbv", "model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": zbv, "timeline": True})
    return run_jobs_or_fail(tmp_path_factory, "timeline", jobs)


@pytest.mark.distributed
def test_timeline_files_show_every_stage(runs: Path) -> None:
    trace = json.loads((runs / "1f1b" / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for stage in (0, 1):
        names = {e["name"] for e in spans if e["tid"] == stage}
        assert {f"F{i}" for i in range(8)} | {f"B{i}" for i in range(8)} <= names
    assert any(e["cat"] == "recv" and e["tid"] == 1 for e in spans)
    assert (runs / "1f1b" / "timeline.png").stat().st_size > 1000


@pytest.mark.distributed
def test_waiting_is_counted_apart_from_the_weight_gradients_that_fill_it(runs: Path) -> None:
    """zero_bubble_v runs weight gradients while it waits for an input gradient: no wait span covers one."""
    assert_matches_reference(load_result(runs, "ref", 0), load_result(runs, "zbv", 0))
    spans = [e for e in json.loads((runs / "zbv" / "timeline.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert any(e["cat"] == "W" for e in spans)
    for stage in (0, 1):
        waits = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["tid"] == stage and e["cat"] == "recv"]
        work = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["tid"] == stage and e["cat"] in "FBW"]
        assert not [(w, b) for w in waits for b in work if w[0] < b[1] - 1 and b[0] < w[1] - 1]  # µs of slack


@pytest.mark.distributed
def test_1f1b_holds_at_most_p_of_m_micro_batches_of_activations(runs: Path) -> None:
    for stage in (0, 1):
        key = f"pipeline/stage{stage}_peak_activation_mb"
        gpipe = load_result(runs, "gpipe", stage)["final_metrics"][key]
        one_f_one_b = load_result(runs, "1f1b", stage)["final_metrics"][key]
        in_flight = 2 - stage  # 1F1B: p - stage micro-batches; GPipe: all 8
        assert one_f_one_b <= gpipe * in_flight / 8 * 1.1, (stage, one_f_one_b, gpipe)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["always", "except_last"])
def test_activation_checkpointing_keeps_the_numbers_and_saves_memory(runs: Path, mode: str) -> None:
    ref = load_result(runs, "ref", 0)
    for rank in range(2):
        got = load_result(runs, f"ckpt-{mode}", rank)
        assert_matches_reference(ref, got)
    saved = load_result(runs, "ckpt-always", 0)["final_metrics"]["pipeline/stage0_peak_activation_mb"]
    kept = load_result(runs, "1f1b", 0)["final_metrics"]["pipeline/stage0_peak_activation_mb"]
    assert saved < kept / 2


@pytest.mark.distributed
def test_checkpointing_every_other_layer_keeps_the_numbers_and_half_the_layers(runs: Path) -> None:
    ref = load_result(runs, "ref", 0)
    for rank in range(2):
        assert_matches_reference(ref, load_result(runs, "ckpt-every2", rank))
    peak = {
        name: load_result(runs, name, 0)["final_metrics"]["pipeline/stage0_peak_activation_mb"]
        for name in ("1f1b", "ckpt-every2", "ckpt-always")
    }
    assert peak["ckpt-always"] < peak["ckpt-every2"] < peak["1f1b"]

"""Public model families nobody here wrote, split as they are: a head registered before the blocks (litgpt, OPT),
``nn.TransformerEncoder`` (inspects its first layer), PEFT LoRA, encoder-decoders (T5, BART) whose decoder blocks
read the encoder's output (one sequence of layers, every boundary, tensors carried beside the activation), and Qwen2
and Phi on padded batches under the zero-bubble schedules with two stages per rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_mp
from lightning_mp.runtime.errors import ModelSplitError
from tests.conftest import assert_matches_reference, load_result, run_jobs_or_fail
from tests.models import make_model

KW = {"batch_size": 6, "n": 20}


def _batch(model: Any) -> dict:
    return torch.utils.data.default_collate([model.dataset(0)[i] for i in range(4)])


# ---- planning (one process) ------------------------------------------------------------------------------------------


def test_an_encoder_decoder_is_one_sequence_of_layers() -> None:
    model = make_model("seq2seq_t5")
    plan, _ = lightning_mp.dry_run(model, _batch(model), pipeline_parallel_size=2, balance=[3, 1])
    assert plan.layers.container_names == ["model.encoder.block", "model.decoder.block"]
    assert "model.encoder.final_layer_norm" in plan.layers.between  # runs between encoder and decoder blocks
    (carry,) = plan.carries_into(1)  # the encoder's output, read by the decoder block of stage 1
    assert carry.source is not None and carry.source[0] == 2 and carry.consumers[0][0] == 3
    assert plan.carries_into(0) == []


def test_modules_are_placed_where_they_run() -> None:
    model = make_model("head_first_gpt")  # registers lm_head and ln_f before its blocks
    plan, _ = lightning_mp.dry_run(model, _batch(model), pipeline_parallel_size=2, balance="uniform")
    assert plan.layers.pre == ["wte"] and sorted(plan.layers.post) == ["lm_head", "ln_f"]


def test_a_decoder_only_model_carries_nothing_beside_the_activation() -> None:
    model = make_model("hf_llama")
    plan, _ = lightning_mp.dry_run(model, _batch(model), pipeline_parallel_size=2, balance="uniform")
    assert plan.carries_into(1) == []


def test_layer_outputs_read_after_the_last_layer_are_refused_on_another_stage() -> None:
    model = make_model("layer_sum_gpt")
    with pytest.raises(ModelSplitError, match=r"output of layer blocks\.\d \(stage 0\) is used after the last layer"):
        lightning_mp.dry_run(model, _batch(model), pipeline_parallel_size=2, balance="uniform")


# ---- exactness on processes ------------------------------------------------------------------------------------------

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "head_first": ("head_first_gpt", {"balance": "uniform"}),
    "torch_encoder": ("torch_encoder", {}),
    "litgpt": ("litgpt_padded", {"schedule": "gpipe"}),
    "peft_lora": ("peft_llama", {"schedule": "zero_bubble"}),
    "t5_encoder_decoder_boundary": ("seq2seq_t5", {"balance": [2, 2]}),
    "t5_inside_decoder": ("seq2seq_t5", {"balance": [3, 1]}),
    "t5_inside_encoder": ("seq2seq_t5", {"balance": [1, 3], "schedule": "zero_bubble"}),
    "t5_interleaved": ("seq2seq_t5", {"balance": [1, 1, 1, 1], "schedule": "interleaved_1f1b"}),
    "bart_inside_decoder": ("seq2seq_bart", {"balance": [3, 1], "schedule": "gpipe"}),
    # padded token-mean losses through the model's own labels=; one block per stage, two stages per rank
    "qwen2_interleaved_zero_bubble": ("padded_hf_qwen2", {"schedule": "zero_bubble", "virtual_stages": 2}),
    "phi_zero_bubble_v": ("padded_hf_phi", {"schedule": "zero_bubble_v"}),
}


def _jobs() -> list[dict[str, Any]]:
    jobs = [{"name": f"ref-{m}", "model": m, "model_kwargs": KW} for m in sorted({m for m, _ in CASES.values()})]
    for case, (model, strategy) in CASES.items():
        options = {"pipeline_parallel_size": 2, "microbatches": 3, **strategy}
        jobs.append({"name": case, "model": model, "model_kwargs": KW, "devices": 2, "strategy": options})
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_jobs_or_fail(tmp_path_factory, "families", _jobs())


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_pp2_matches_one_process(runs: Path, case: str) -> None:
    ref = load_result(runs, f"ref-{CASES[case][0]}", 0)
    for rank in (0, 1):
        assert_matches_reference(ref, load_result(runs, case, rank))


@pytest.mark.distributed
def test_encoder_decoder_with_data_parallelism_matches_ddp(tmp_path_factory: pytest.TempPathFactory) -> None:
    kw = {"batch_size": 4, "n": 32}
    ddp = run_jobs_or_fail(
        tmp_path_factory,
        "t5_ddp",
        [{"name": "ddp", "model": "seq2seq_t5", "model_kwargs": kw, "devices": 2, "strategy": "ddp"}],
    )
    strategy = {"pipeline_parallel_size": 2, "data_parallel_size": 2, "microbatches": 2, "balance": [3, 1]}
    runs = run_jobs_or_fail(
        tmp_path_factory,
        "t5_dp2pp2",
        [{"name": "dp2pp2", "model": "seq2seq_t5", "model_kwargs": kw, "devices": 4, "strategy": strategy}],
    )
    for rank in range(4):
        assert_matches_reference(load_result(ddp, "ddp", rank // 2), load_result(runs, "dp2pp2", rank))

"""Random configurations, valid and invalid, on two processes: each one either trains to the one-process numbers or
fails with an error that names the setting, within a bounded time. None hangs.

The examples are drawn with a fixed seed (``derandomize``) so that CI runs the same ones each time; raise
``LIGHTNING_MP_PROPERTY_EXAMPLES`` to explore more locally.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_matches_reference, load_result, run_harness
from tests.runtime.timing import run_harness_timed

pytestmark = pytest.mark.distributed

KW = {"layers": 4, "batch_size": 4, "n": 16, "lengths": [8]}
BOUND_S = 90  # failing configurations end every rank within this after start-up (in practice a few seconds)
EXAMPLES = int(os.environ.get("LIGHTNING_MP_PROPERTY_EXAMPLES", "10"))

CONFIGS = st.fixed_dictionaries(
    {
        # valid values drawn more often than invalid ones, so that both outcomes are exercised
        "pipeline_parallel_size": st.sampled_from([2, 2, 2, 2, 3, 4]),
        "schedule": st.sampled_from(["gpipe", "1f1b", "none", "gpipe", "1f1b", "none", "interleaved"]),
        "microbatches": st.sampled_from([1, 2, 3, 4, 6, "auto"]),
        "balance": st.sampled_from(["uniform", "params", "time", [1, 3], [2, 2], [3, 1], [4, 0], [2, 1]]),
    }
)


def expected_errors(config: dict[str, Any]) -> list[str]:
    """Patterns of the messages an invalid ``config`` may fail with (several settings can be wrong at once)."""
    errors = []
    pp, balance, m = config["pipeline_parallel_size"], config["balance"], config["microbatches"]
    if pp != 2:
        errors.append(rf"not divisible by pipeline_parallel_size\({pp}\)")
    if config["schedule"] == "interleaved":
        errors.append(r"schedule='interleaved' is not supported: choose one of")
    if isinstance(balance, list) and (sum(balance) != 4 or min(balance) < 1):
        errors.append(rf"balance={re.escape(str(balance))}.*e\.g\. balance=\[")
    if isinstance(balance, list) and len(balance) != pp:
        errors.append(rf"balance={re.escape(str(balance))} has {len(balance)} entries but pipeline_parallel_size={pp}")
    if isinstance(m, int) and m > KW["batch_size"] and config["schedule"] != "none":
        errors.append(rf"microbatches={m} is larger than the batch of 4 samples")
    return errors


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("property-ref")
    proc = run_harness([{"name": "ref", "model": "gpt", "model_kwargs": KW}], out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return load_result(out, "ref", 0)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a multi-process run; report it as drawn
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config=CONFIGS)
def test_any_configuration_trains_exactly_or_fails_clearly(
    tmp_path_factory: pytest.TempPathFactory, reference: dict[str, Any], config: dict[str, Any]
) -> None:
    out: Path = tmp_path_factory.mktemp("property")
    job = {"name": "run", "model": "gpt", "model_kwargs": KW, "devices": 2, "strategy": {**config, "timeout": 30}}
    proc = run_harness_timed([job], out, timeout=BOUND_S + 240)  # start-up is not part of BOUND_S
    elapsed = proc.after_start_s
    errors = expected_errors(config)
    print("PROPERTY", config, "->", errors or "valid", f"{elapsed:.1f}s")
    if not errors:
        assert proc.returncode == 0, f"{config} should train:\n{proc.stderr[-4000:]}"
        for rank in range(2):
            assert_matches_reference(reference, load_result(out, "run", rank))
        return
    assert proc.returncode != 0, f"{config} should have been refused"
    assert not proc.leftover and elapsed < BOUND_S, f"{config} took {elapsed:.0f} s to fail after start-up"
    assert any(re.search(e, proc.stderr) for e in errors), f"{config}: expected one of {errors}:\n{proc.stderr[-3000:]}"

"""Shared fixtures: running the multi-process harness (tests/harness.py) and comparing with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_mp.plan.stage_plan import is_placeholder

ROOT = Path(__file__).resolve().parent.parent
# What a test process may have set that must not reach a job it starts: rank variables, and the seed that
# ``seed_everything`` (e.g. LightningCLI in a test) leaves in the environment, which would make the job's ranks reseed
# at set-up while its one-process reference does not.
JOB_ENV_LEFT_OUT = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def run_script(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a Python script as a fresh job (no inherited rank variables); Lightning launches the other ranks."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV_LEFT_OUT}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_harness(jobs: list[dict[str, Any]], out_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``jobs`` through tests/harness.py (see its docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    return run_script([str(ROOT / "tests" / "harness.py"), str(spec), str(out_dir)], timeout)


def run_jobs_or_fail(factory: pytest.TempPathFactory, name: str, jobs: list[dict[str, Any]]) -> Path:
    """Run ``jobs`` in a fresh directory and return it; fail with the ranks' output if the run failed."""
    out = factory.mktemp(name)
    proc = run_harness(jobs, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def load_result(out_dir: Path, job: str, rank: int) -> dict[str, Any]:
    return torch.load(out_dir / job / f"rank{rank}.pt", weights_only=False)


def assert_matches_reference(ref: dict[str, Any], got: dict[str, Any], atol: float = 1e-5) -> None:
    """Same losses at every step and, for every parameter the rank holds, the same values as one process."""
    assert len(got["losses"]) == len(ref["losses"])
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"])):
        assert abs(a - b) <= atol, f"loss differs at step {step}: {a} vs {b}"
    assert got["params"], "this rank holds no parameters"
    for name, value in got["params"].items():
        if is_placeholder(name):
            continue  # the empty parameter of a stage with nothing to train
        assert name in ref["params"], f"unexpected parameter name {name}"
        diff = (value - ref["params"][name]).abs().max().item()
        assert diff <= atol, f"{name} differs by {diff}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "distributed: runs real multi-process training (slow; skip with -m 'not distributed')"
    )
    config.addinivalue_line(
        "markers", "cuda: needs CUDA GPUs (skipped without them); run on a machine with 2 or more GPUs: pytest -m cuda"
    )

"""Several machines: two "nodes" of two processes each, launched by torchrun on loopback, train a 4-stage pipeline
whose stages span the nodes to the numbers of one process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_matches_reference, load_result, run_harness

pytestmark = pytest.mark.distributed

KW = {"layers": 4, "batch_size": 4, "n": 16, "lengths": [8]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(node: int, port: int, spec: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=2",
        f"--node-rank={node}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        str(ROOT / "tests" / "harness.py"),
        str(spec),
        str(out),
    ]


def test_two_nodes_under_torchrun_match_one_process(tmp_path: Path) -> None:
    proc = run_harness([{"name": "ref", "model": "gpt", "model_kwargs": KW}], tmp_path / "ref")
    assert proc.returncode == 0, proc.stderr[-5000:]
    job = {
        "name": "nodes",
        "model": "gpt",
        "model_kwargs": KW,
        "devices": 2,
        "trainer": {"num_nodes": 2},
        "strategy": {"pipeline_parallel_size": 4, "microbatches": 4, "timeout": 120},
    }
    out = tmp_path / "nodes"
    out.mkdir()
    spec = out / "jobs.json"
    spec.write_text(json.dumps([job]))
    port = _free_port()
    nodes = [
        subprocess.Popen(_torchrun(n, port, spec, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in (0, 1)
    ]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-4000:] for log in logs)
    ref = load_result(tmp_path / "ref", "ref", 0)
    stages = [load_result(out, "nodes", rank) for rank in range(4)]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]  # stage 1 on node 0 sends to stage 2 on node 1
    for got in stages:
        assert_matches_reference(ref, got)

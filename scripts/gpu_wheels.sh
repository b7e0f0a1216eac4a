#!/usr/bin/env bash
# Wheels of this project's dependencies that a GPU machine without package registries lacks (its image has
# torch, lightning, torchaudio, torchmetrics, tensorboard, matplotlib, scipy, numpy, PyYAML, tqdm), for
# Python 3.12 on x86-64 Linux, into .whl/ (git-ignored). scripts/gpu_check.sh installs them from there.
#
#   bash scripts/gpu_wheels.sh        # here, where pip reaches a registry; then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl jsonargparse docstring-parser typeshed-client jiwer rapidfuzz soundfile espeakng-loader platformdirs \
  cffi pycparser
ls -la .whl

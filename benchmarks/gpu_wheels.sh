#!/usr/bin/env bash
# Fetch into .wheels/ (git-ignored) what the GPU machine lacks, for gpu_session.sh to install
# without a package registry: pydantic, hatchling and torchmetrics (aecli's own), the test extras
# diffusers and tensorboard, lpips and torch-fidelity without their dependencies (torch comes with
# the machine), and scikit-image without its dependencies (benchmarks/quality.py reads only its
# photos' files).
# Wheels of packages that machine already has (numpy, pillow, pyyaml, safetensors) are dropped so that the
# set stays well inside the device tool's 64 MiB carry. Run it here, then carry .wheels:
#
#   bash benchmarks/gpu_wheels.sh && run ... carry=[".wheels"] "bash benchmarks/gpu_session.sh tests train"
set -euo pipefail
cd "$(dirname "$0")/.."
target=(--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .wheels)
python3 -m pip download -q "${target[@]}" pydantic hatchling editables diffusers tensorboard
python3 -m pip download -q --no-deps "${target[@]}" lpips scikit-image lazy_loader torch-fidelity \
  torchmetrics lightning-utilities
rm -f .wheels/numpy-* .wheels/pillow-* .wheels/pyyaml-* .wheels/safetensors-*
echo ".wheels: $(ls .wheels | wc -l) wheels, $(du -sh .wheels | cut -f1)"

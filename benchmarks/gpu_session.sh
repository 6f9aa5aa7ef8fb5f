#!/usr/bin/env bash
# Everything a GPU machine should check, in stages that each fit one 10-minute call on a machine
# without a package registry: install from the wheels carried in .wheels/ (gpu_wheels.sh fetches
# them; see README, Development), then run the stage, its output also written under $OUT
# (default: ./gpu-out).
#
#   bash benchmarks/gpu_session.sh tests     # the whole pytest, then the README's first command
#   bash benchmarks/gpu_session.sh speed     # train_speed.py and reconstruct_speed.py at 10,000
#   bash benchmarks/gpu_session.sh kl        # kl_speed.py: cat-kl-f8 against diffusers, MFU
#   bash benchmarks/gpu_session.sh quality   # quality.py --pairs kl (cat-kl-f8's held-out row)
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:?stage: tests, speed, kl or quality}"
out="${OUT:-gpu-out}"
mkdir -p "$out"
log="$out/$stage.log"

{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  if [ -d .wheels ]; then
    python3 -m pip install -q --no-index --find-links .wheels hatchling pydantic 2>&1 | tail -2
    python3 -m pip install -q --no-index --find-links .wheels diffusers lpips tensorboard \
      2>&1 | tail -2 || echo "test extras not carried: their tests skip"
  fi
  python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -2
  python3 -c "import aecli, torch; print('aecli', aecli.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$log"

run() { echo "\$ $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }

case "$stage" in
  tests)
    start=$(date +%s)
    run python3 -m pytest -q -p no:cacheprovider -rs
    echo "pytest: $(( $(date +%s) - start )) s" | tee -a "$log"
    rm -rf runs/demo
    start=$(date +%s)
    run aecli train --out runs/demo
    echo "README first command: $(( $(date +%s) - start )) s" | tee -a "$log"
    ;;
  speed)
    run python3 benchmarks/train_speed.py --device cuda --steps 300 --repeats 3
    run python3 benchmarks/reconstruct_speed.py --device cuda --images 10000 --dir /dev/shm
    ;;
  kl)
    run python3 benchmarks/kl_speed.py --device cuda
    run python3 benchmarks/kl_speed.py --device cuda --batch 32 --repeats 1 \
      --variants eager --set train.cuda_graph=true
    ;;
  quality)
    # one seed: 20,000 images at the issue's 54 img/s take about 6 minutes of the call's 10
    run python3 benchmarks/quality.py --pairs kl --device cuda --repeats 1
    ;;
  *)
    echo "unknown stage $stage: tests, speed, kl or quality" >&2
    exit 2
    ;;
esac

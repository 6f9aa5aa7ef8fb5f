#!/usr/bin/env bash
# Everything a GPU machine should check, on a machine without a package registry: install from
# the wheels carried in .wheels/ (gpu_wheels.sh fetches them; see docs/development.md), then run
# the named stages in order, each under its own time limit so that what finished still reports
# (the device tool's call is 10 minutes), the log also written under $OUT (default: ./gpu-out).
#
#   bash benchmarks/gpu_session.sh tests train       # one call: about 9 minutes at most
#   bash benchmarks/gpu_session.sh reconstruct kl    # the next call
#
#   tests        the whole pytest (8 processes with pytest-xdist, where installed), then the
#                README's first command, both timed
#   train        train_speed.py (presets at their batch and at 1024, eager and +graph)
#   reconstruct  reconstruct_speed.py at 10,000 JPEGs in /dev/shm
#   speed        train, then reconstruct
#   kl           kl_speed.py: cat-kl-f8 against diffusers, MFU, then aecli with train.cuda_graph
#   profile      kl_speed.py --profile: where cat-kl-f8's step spends its GPU time, aecli and diffusers
#   quality      quality.py --pairs kl (cat-kl-f8's held-out row)
#   encode       encode_scale.py: 10,000 images at 256x256 through cat-kl-f8 into a latent folder
#   tiles        tiling.py --large: a 4096x4096 decode with the full SD VAE layout, automatic
#                tiling against diffusers' enable_tiling(); then tiling.py's table on CUDA
#   vaes         vae_families.py: every VAE family aecli reads at its released widths, encode and
#                decode of 8 images of 512x512, model alone and whole command, against diffusers
#   eval         aecli eval on an SD VAE folder (SD_VAE, default weights/sd-vae-ft-mse) over
#                EVAL_DATA (default data/coco/val2017) at 256x256: the line to put beside
#                Stability's table; rFID and LPIPS-VGG where their weights are in torch's hub
#                cache (or FID_WEIGHTS / LPIPS_WEIGHTS name them); skipped when either is absent
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "stages: tests, train, reconstruct, speed, kl, profile, quality, encode, tiles, vaes or eval" >&2; exit 2; }
out="${OUT:-gpu-out}"
mkdir -p "$out"
log="$out/$(IFS=-; echo "$*").log"

{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  if [ -d .wheels ]; then
    python3 -m pip install -q --no-index --find-links .wheels hatchling pydantic 2>&1 | tail -2
    python3 -m pip install -q --no-index --no-deps --find-links .wheels scikit-image lazy_loader \
      2>&1 | tail -2
    python3 -m pip install -q --no-index --find-links .wheels diffusers lpips tensorboard \
      2>&1 | tail -2 || echo "test extras not carried: their tests skip"
    python3 -m pip install -q --no-index --find-links .wheels torchmetrics torch-fidelity \
      2>&1 | tail -2 || echo "eval extra not carried: rFID tests skip, eval measures no rFID"
  fi
  python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -2
  python3 -c "import aecli, torch; print('aecli', aecli.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$log"

# run LIMIT_S COMMAND...: the command under a time limit, its output in the log as it comes
run() {
  local limit="$1"; shift
  echo "\$ $* (limit ${limit} s)" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "[rc $rc, $(( SECONDS - start )) s]" | tee -a "$log"
}

stages=()
for stage in "$@"; do  # speed is train, then reconstruct
  if [ "$stage" = speed ]; then stages+=(train reconstruct); else stages+=("$stage"); fi
done

for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      parallel=()
      python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
      run 270 python3 -m pytest -q -p no:cacheprovider -rs "${parallel[@]}"
      rm -rf runs/demo
      run 60 aecli train --out runs/demo
      ;;
    train)
      run 270 python3 benchmarks/train_speed.py --device cuda --steps 300 --repeats 3
      ;;
    reconstruct)
      run 240 python3 benchmarks/reconstruct_speed.py --device cuda --images 10000 --dir /dev/shm
      ;;
    kl)
      run 240 python3 benchmarks/kl_speed.py --device cuda
      run 90 python3 benchmarks/kl_speed.py --device cuda --batch 32 --repeats 1 \
        --variants eager --set train.cuda_graph=true
      ;;
    profile)
      run 150 python3 benchmarks/kl_speed.py --device cuda --batch 16 --repeats 0 --profile 15
      ;;
    encode)
      run 540 python3 benchmarks/encode_scale.py --device cuda --preset cat-kl-f8 --size 256x256 \
        --buckets 256 --images 10000 --repeats 1 --dir /dev/shm
      ;;
    tiles)
      run 300 python3 benchmarks/tiling.py --large --device cuda --free-gb 16
      run 240 python3 benchmarks/tiling.py --device cuda --tile 256
      ;;
    vaes)
      run 540 python3 benchmarks/vae_families.py --size release --device cuda --image 512 \
        --images 8 --repeats 3 --command-repeats 1
      ;;
    eval)
      vae="${SD_VAE:-weights/sd-vae-ft-mse}"
      data="${EVAL_DATA:-data/coco/val2017}"
      if [ ! -f "$vae/config.json" ] && [ ! -f "$vae/vae/config.json" ] || [ ! -d "$data" ]; then
        echo "eval: skipped: needs an SD VAE folder at $vae (SD_VAE) and images at $data" \
          "(EVAL_DATA); nothing is downloaded" | tee -a "$log"
      else
        hub="$(python3 -c 'import torch; print(torch.hub.get_dir())')/checkpoints"
        measures=()
        if [ -n "${FID_WEIGHTS:-}" ]; then
          measures+=(--fid-weights "$FID_WEIGHTS")
        elif compgen -G "$hub/*inception-2015-12-05-6726825d.pth" >/dev/null; then
          measures+=(--fid)
        else
          echo "eval: no Inception weights in $hub (or FID_WEIGHTS): rFID left out" | tee -a "$log"
        fi
        if [ -n "${LPIPS_WEIGHTS:-}" ]; then
          measures+=(--lpips vgg --lpips-weights "$LPIPS_WEIGHTS")
        elif [ -f "$hub/vgg16-397923af.pth" ]; then
          measures+=(--lpips vgg)
        else
          echo "eval: no VGG16 weights in $hub (or LPIPS_WEIGHTS): LPIPS left out" | tee -a "$log"
        fi
        # the JSON (every setting named) to $out/eval.json; the table and the line to the log
        run 540 sh -c 'json="$1"; shift; aecli eval "$@" --json > "$json"' sh "$out/eval.json" \
          "$vae" "$data" --size 256 --device cuda "${measures[@]}"
      fi
      ;;
    quality)
      # one seed: 20,000 images at the issue's 54 img/s take about 6 minutes of the call's 10
      run 540 python3 benchmarks/quality.py --pairs kl --device cuda --repeats 1
      ;;
    *)
      echo "unknown stage $stage: tests, train, reconstruct, speed, kl, profile, quality, encode, tiles, vaes or eval" | tee -a "$log" >&2
      exit 2
      ;;
  esac
done

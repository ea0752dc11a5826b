#!/usr/bin/env bash
# Continue training flair-lgg on a CUDA machine with the acquisition augmentation, and try the 96 x 96 grid.
#
#   tools/train_on_gpu.sh OUTPUT_DIR [MINUTES] [SLICES_64] [SLICES_96]
#
# Two runs share the GPU at the same time (RUNS="flair-lgg-aug" for the first alone), each at batch 64 with a
# checkpoint every minute, each stopping after MINUTES (default 8) of training:
#   OUTPUT_DIR/flair-lgg-aug  flair-lgg's shipped weights trained further on its 64 x 64 grid
#   OUTPUT_DIR/flair-lgg-96   a 96 x 96 network from scratch (the same channels)
# both with gamma, intensity-scale, bias-field and skull-strip augmentation, each keeping its EMA weights every
# 1,500 steps (RUN/snapshots/step-NNNNNN), since the checkpoint to ship is chosen on the development sets, not by
# the validation MSE. The same command again continues both (--resume) for another MINUTES. Afterwards the new
# cards get flair-lgg's post-processing and sampling settings, and the script prints the commands that compare
# the snapshots and calibrate the chosen one where the data is.
#
# Needs only this repository, `pip install -e .` and a CUDA build of PyTorch: the training slices travel as
# files from `autoddpm prepare-slices` (SLICES_64, SLICES_96; default OUTPUT_DIR/flair-train-64.safetensors
# and -96). Where they are missing and the data is at $AUTODDPM_DATA (default ../shared/data), the script
# makes them. PYTHON (default python3) runs the engine; AUTODDPM_DEVICE=cpu makes a smoke run without a GPU.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 4 ]]; then
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
minutes="${2:-8}"
slices64="${3:-$out/flair-train-64.safetensors}"
slices96="${4:-$out/flair-train-96.safetensors}"
python="${PYTHON:-python3}"
device="${AUTODDPM_DEVICE:-cuda}"
data="${AUTODDPM_DATA:-$repo/../shared/data}"
cd "$repo"  # the shipped model is found by name from here
autoddpm() { "$python" -m AutoDDPMLib.cli "$@"; }

if ! "$python" -c "import AutoDDPMLib, torch" 2>/dev/null; then
  echo "train_on_gpu: $python cannot import AutoDDPMLib and torch: run \`pip install -e .\` in $repo first" >&2
  exit 2
fi
if [[ "$device" == cuda ]] && ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "train_on_gpu: PyTorch sees no CUDA GPU here (AUTODDPM_DEVICE=cpu for a smoke run on the CPU)" >&2
  exit 2
fi

# Which runs (RUNS, default both): flair-lgg-aug needs the 64-pixel slices, flair-lgg-96 the 96-pixel ones.
read -r -a runs <<< "${RUNS:-flair-lgg-aug flair-lgg-96}"
grid_of() { case "$1" in flair-lgg-aug) echo 64 ;; flair-lgg-96) echo 96 ;; *) return 1 ;; esac; }
for run in "${runs[@]}"; do
  grid_of "$run" >/dev/null || { echo "train_on_gpu: unknown run '$run' in RUNS: flair-lgg-aug or flair-lgg-96" >&2; exit 2; }
done

# The training slices: the healthy slices of the 80 LGG training patients, preprocessed as `train` would.
for run in "${runs[@]}"; do
  grid="$(grid_of "$run")"
  file="slices$grid"
  if [[ ! -f "${!file}" ]]; then
    if [[ ! -d "$data/lgg_flair/train" ]]; then
      echo "train_on_gpu: no ${!file}, and no training data at $data/lgg_flair/train to make it from. Where the" \
           "data is, run: autoddpm prepare-slices --data ../shared/data/lgg_flair/train" \
           "--image-size $grid --output flair-train-$grid.safetensors; then give the files to this script" >&2
      exit 2
    fi
    # flair-lgg's preprocessing is the default one; --like would also take its 64-pixel grid.
    autoddpm prepare-slices --data "$data/lgg_flair/train" --image-size "$grid" --output "${!file}"
  fi
done

augmentation=(--augment-gamma 0.3 --augment-contrast 0.15 --augment-bias-field 0.3 --augment-skull-strip 0.3)
card=(--name flair-lgg --modality FLAIR
      --valid-for "axial FLAIR brain MRI, with skull or skull-stripped, whole brain, all slice levels"
      --license "CC BY-NC-SA 4.0 (follows the training data: TCGA-LGG / Buda et al. 2019; non-commercial)"
      --description "Axial FLAIR, whole brain, all slice levels; trained on the lesion-free slices of 80 lower-grade glioma patients, with scanner and skull-stripping augmentation")
budget=(--batch-size 64 --device "$device" --max-minutes "$minutes" --checkpoint-minutes 1 --steps 1000000
        --snapshot-steps "${SNAPSHOT_STEPS:-1500}")

# One run: continued from its checkpoint where there is one, else started with the given arguments.
train() {
  local run="$out/$1"; shift
  if [[ -f "$run/checkpoint/state.json" ]]; then
    autoddpm train --output "$run" --resume --max-minutes "$minutes"
  else
    autoddpm train --output "$run" "$@"
  fi
}

echo "train_on_gpu: ${runs[*]} for $minutes minutes on $device; logs in $out/*.log"
declare -A started
for run in "${runs[@]}"; do
  case "$run" in
    flair-lgg-aug) train "$run" --data "$slices64" --init-from flair-lgg "${budget[@]}" "${card[@]}" "${augmentation[@]}" ;;
    flair-lgg-96) train "$run" --data "$slices96" --image-size 96 "${budget[@]}" "${card[@]}" "${augmentation[@]}" ;;
  esac > "$out/$run.log" 2>&1 &
  started[$run]=$!
done
status=0
for run in "${runs[@]}"; do
  wait "${started[$run]}" || { status=1; echo "train_on_gpu: $run failed, see $out/$run.log" >&2; }
done

# A new card has placeholder thresholds and the paper's settings; flair-lgg's were chosen on lgg-dev.
for run in "${runs[@]}"; do
  if [[ -f "$out/$run/model.json" ]]; then
    "$python" - "$out/$run" <<'EOF'
import json, sys
from pathlib import Path

from AutoDDPMLib.models.bundle import read_card, resolve_model, write_card

shipped = read_card(resolve_model("flair-lgg")).data
new = read_card(Path(sys.argv[1])).data
new.update({key: shipped[key] for key in ("postprocessing", "schedules", "lpips_image_size")})
write_card(sys.argv[1], new)
training = new["training"]
print(f"{sys.argv[1]}: {training['steps']} steps in this run, validation MSE(t=200) {training['validation_mse_t200']:.5f}")
EOF
  fi
  tail -n 3 "$out/$run.log" | tr '\r' '\n' | tail -n 2
done

cat <<EOF

Where the data is (../shared/data), choose on the 10 lgg-dev patients, with skull and skull-stripped (each
snapshot is calibrated as flair-lgg was, on the validation patients' healthy slices and volumes, then scored
on the development patients; about 12 minutes a snapshot on 2 CPU cores):
  python tools/compare_checkpoints.py flair-lgg $out/flair-lgg-aug/snapshots/step-* $out/flair-lgg-96 --data ../shared/data --work $out/compare
(it scales the step-1 mask's dilation to the 96 grid: flair-lgg's 9 pixels become 13), then calibrate the
chosen one (WORK/LABEL/model) for the reference schedule too before shipping it:
  autoddpm calibrate CHOSEN --data ../shared/data/lgg_flair/val --max-slices 32 --schedule reference
Continue: RUNS="${runs[*]}" $0 $*
EOF
exit "$status"

#!/usr/bin/env bash
# The CPU demo, from this bundle's folder: stage 1 (autoencoder), stage 2 (conditional latent U-Net), then the
# pathology x modality grid into outputs/ with montage.png and a table of region ratios per modality.
# Each step takes as many torch threads as cores are idle when it starts (one on a busy machine); pass
# --num_threads N to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=(--num_threads idle)
for arg in "$@"; do [[ $arg == --num_threads* ]] && threads=(); done
python -m monai.bundle run training --config_file "['configs/train_autoencoder.json','configs/demo.json']" "${threads[@]}" "$@"
python -m monai.bundle run training --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json','configs/demo.json']" "${threads[@]}" "$@"
python -m monai.bundle run demo --config_file "['configs/inference.json','configs/demo.json']" --grid true "${threads[@]}" "$@"

#!/usr/bin/env bash
# The CPU demo, from this bundle's folder: stage 1 (autoencoder), stage 2 (conditional latent U-Net), then the
# pathology x modality grid into outputs/ with montage.png and a table of region ratios per modality.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m monai.bundle run training --config_file "['configs/train_autoencoder.json','configs/demo.json']" "$@"
python -m monai.bundle run training --config_file "['configs/train_autoencoder.json','configs/train_diffusion.json','configs/demo.json']" "$@"
python -m monai.bundle run demo --config_file "['configs/inference.json','configs/demo.json']" --grid true "$@"

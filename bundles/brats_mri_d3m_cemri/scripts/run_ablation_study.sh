#!/usr/bin/env bash
# Train and evaluate D3M, its two ablations and the Palette-like baseline on the same data, then compare them.
# Usage (from the bundle folder): scripts/run_ablation_study.sh OUTPUT_DIR [extra config overlay ...]
#   e.g. scripts/run_ablation_study.sh /tmp/d3m_study configs/demo.json configs/cpu_experiment.json
# With no overlay it runs the paper-scale configs (GPU, days). Results: OUTPUT_DIR/eval/comparison_per_*.md
set -euo pipefail
out=${1:?output directory}; shift
overlays=""
for f in "$@"; do overlays+=",'$f'"; done
for variant in d3m no_mssdm no_dsimd palette; do
    extra=""
    [ "$variant" != d3m ] && extra=",'configs/$variant.json'"
    /usr/bin/time -f "$variant training: %e s wall, %U s user CPU, %M KB max RSS" \
        python -m monai.bundle run training --bundle_root "$out" --logging_file configs/logging.conf \
        --config_file "['configs/train.json'$overlays$extra]"
    /usr/bin/time -f "$variant evaluation: %e s wall, %U s user CPU, %M KB max RSS" \
        python -m monai.bundle run evaluating --bundle_root "$out" --logging_file configs/logging.conf \
        --config_file "['configs/inference.json','configs/evaluate.json'$overlays$extra]"
done
python -m monai.bundle run comparing --bundle_root "$out" --logging_file configs/logging.conf \
    --config_file "['configs/inference.json','configs/evaluate.json'$overlays]"

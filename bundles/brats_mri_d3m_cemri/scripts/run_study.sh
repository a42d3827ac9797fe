#!/usr/bin/env bash
# D3M evidence study: train D3M, its two ablations and the Palette-like baseline on the same data (mask-estimate
# diagnostics logged during training), evaluate each on the held-out subjects' tumour slices, sample the D3M model
# again with its deformation switched off and at low noise levels only, then compare (paired Wilcoxon, slices and
# volumes) and draw the figures.
# Usage (from the bundle folder): scripts/run_study.sh OUTPUT_DIR [config overlay ...]
#   CPU scale: scripts/run_study.sh /tmp/d3m_study configs/demo.json configs/study_cpu.json
#   paper scale (GPU, days): scripts/run_study.sh RUN my_data.json   ({"dataset_dir": "/data/BraTS2023-GLI"})
# VARIANTS="d3m no_mssdm" runs a subset (e.g. in two processes); the report is written once all four exist.
# Results: OUTPUT_DIR/study/ (study.md, study.json, PNGs).
set -euo pipefail
# out, overlays and run LABEL RUN_ID CONFIGS [ARGS ...]: the study preamble every bundle shares
steps=$(python -m brainsynth.engine.study preamble "$@"); eval "$steps"
eval_configs="'configs/inference.json','configs/evaluate.json'"
for variant in ${VARIANTS:-d3m no_mssdm no_dsimd palette}; do
    extra=""
    [ "$variant" != d3m ] && extra=",'configs/$variant.json'"
    [ -f "$out/eval/${variant}_per_slice.csv" ] && { echo "$variant: already evaluated, skipped"; continue; }
    run "$variant training" training "'configs/train.json'$extra"
    run "$variant evaluation" evaluating "$eval_configs$extra"
    if [ "$variant" = d3m ]; then  # the same trained model, sampled without its deformation / at low noise only
        run "d3m evaluation, deformation off" evaluating "$eval_configs" --sample_with_mssdm false \
            --eval_method d3m_warp_off
        for t in 250 500; do
            run "d3m evaluation, deformation at t <= $t" evaluating "$eval_configs" --mssdm_max_timestep $t \
                --eval_method d3m_warp_t$t
        done
    fi
done
for variant in d3m no_mssdm no_dsimd palette; do
    [ -f "$out/eval/${variant}_per_slice.csv" ] || { echo "report waits for $variant"; exit 0; }
done
python scripts/study_report.py "$out" --out "$out/study"

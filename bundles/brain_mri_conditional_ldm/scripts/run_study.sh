#!/usr/bin/env bash
# Conditional LDM evidence study: the judge (the in-house pathology / modality network, trained on a separate
# simulated cohort and checked on the study's held-out real scans), both training stages with two pathology x
# modality combinations held out of both, the autoencoder's per-modality contrast fidelity, then every combination
# sampled under several guidance settings and scored by the judge, and the report with figures.
# Usage (from the bundle folder): scripts/run_study.sh OUTPUT_DIR [config overlay ...]
#   CPU scale (about 90 min on one core): scripts/run_study.sh /tmp/ldm_study configs/demo.json configs/study_cpu.json
# STAGES="train" stops after training (e.g. to evaluate later). Finished steps are skipped when run again.
# Results: OUTPUT_DIR/study/ (study.md, study.json, PNGs).
set -euo pipefail
# out, overlays and run LABEL RUN_ID CONFIGS [ARGS ...]: the study preamble every bundle shares
steps=$(python -m brainsynth.engine.study preamble "$@"); eval "$steps"
[ -f "$out/models/model_autoencoder.pt" ] || run "stage 1 (autoencoder)" training "'configs/train_autoencoder.json'"
[ -f "$out/models/model.pt" ] || run "stage 2 (latent U-Net)" training "'configs/train_autoencoder.json','configs/train_diffusion.json'"
[ "${STAGES:-all}" = train ] && exit 0
# every setting samples the same requests (same seeds) and is scored by the same judge (trained by the first);
# SETTINGS="per_condition_3 joint_3" runs a subset (e.g. in two processes); the report waits until all exist
all="guidance_1:per_condition:1 per_condition_3:per_condition:3 joint_3:joint:3 per_condition_6:per_condition:6"
for s in $all; do
    IFS=: read -r name mode scale <<< "$s"
    [[ " ${SETTINGS:-$name} " == *" $name "* ]] || continue
    [ -f "$out/eval/$name/metrics.json" ] && { echo "$name: already evaluated, skipped"; continue; }
    run "sampling and scoring, $name" evaluating "'configs/inference.json','configs/evaluate.json'" \
        --guidance_mode "$mode" --guidance_scale "$scale" --eval_dir "$out/eval/$name" \
        --feature_network_path "$out/judge/feature_network.pt" --montage false --progress false
done
names=""
for s in $all; do
    names+="'${s%%:*}',"
    [ -f "$out/eval/${s%%:*}/metrics.json" ] || { echo "report waits for ${s%%:*}"; exit 0; }
done
python scripts/study_report.py "$out" --out "$out/study" \
    --config_file "['configs/inference.json','configs/evaluate.json'$overlays]" --settings "[$names]"

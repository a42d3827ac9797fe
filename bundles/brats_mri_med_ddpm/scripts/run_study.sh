#!/usr/bin/env bash
# Med-DDPM evidence study: image quality against the real test scans, then the downstream experiment (SegResNet on
# real / synthetic / real + synthetic and the data-scarce arms, several seeds, paired tests) and the memorisation
# audit, with figures. Usage (from the bundle folder): scripts/run_study.sh RUN_DIR [config overlay ...]
#   CPU scale (about 90 min on one core): scripts/run_study.sh /tmp/med_ddpm_study configs/demo.json configs/study_cpu.json
#   paper scale (GPU): scripts/run_study.sh RUN my_data.json   (my_data.json: {"dataset_dir": "/data/BraTS2021"})
# Results: RUN_DIR/eval_ancestral/metrics.md, RUN_DIR/eval/downstream/downstream.md and its PNGs.
set -euo pipefail
# out, overlays and run LABEL RUN_ID CONFIGS [ARGS ...]: the study preamble every bundle shares
steps=$(python -m brainsynth.engine.study preamble "$@"); eval "$steps"
run "generator training" training "'configs/train.json'"
run "evaluation (250-step ancestral sampler)" evaluating "'configs/inference.json','configs/evaluate.json'" \
    --sampler ddpm --log_dir "$out/eval_ancestral" --progress false
run "downstream + memorisation (25-step ancestral DDIM)" downstream "'configs/inference.json','configs/downstream.json'" \
    --sampler ddim --num_inference_steps 25 --ddim_eta 1.0 --progress false

#!/usr/bin/env bash
# The one prepared GPU measurement (see ci/gpu_check.py): every bundle's training stages (fp32, bf16,
# bf16 + activation checkpointing, compile) and samplers at paper size, under a wall-clock budget, each case in its
# own process. Run on the GPU machine from the repository root, with the project installed (pip install -e .) or,
# where nothing can be installed, with monai, nibabel and pytorch-ignite carried as wheels in .whl/:
#
#     bash ci/gpu_check.sh [--out DIR] [--budget SECONDS]
#
# The CPU smoke run of the same code is `python ci/gpu_check.py --tiny --out DIR` (in the default test suite).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/brainsynth-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/brainsynth-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/common:${PYTHONPATH:-} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
exec python3 ci/gpu_check.py "$@"

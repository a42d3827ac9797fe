#!/usr/bin/env bash
# The one run a lent GPU gets (ci/gpu_check.py says what it runs): each bundle's training, inference with every
# sampler twice and evaluate through `python -m monai.bundle run`, torchrun on every multi-GPU overlay, a CPU-vs-CUDA
# comparison, then the paper-size timing cases in the time left; at most 8 minutes; exit status non-zero on any
# failure. Run from anywhere, with the project installed (pip install -e .) or, where nothing can be installed, with
# monai, nibabel and pytorch-ignite carried as wheels in .whl/:
#
#     bash ci/gpu_check.sh [--out DIR] [--budget SECONDS]          # on the GPU machine
#     bash ci/gpu_check.sh --device cpu --out DIR                   # the same list at the tiny size, on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/brainsynth-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/brainsynth-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/common:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [[ " $* " != *" --device cpu "* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
exec python3 ci/gpu_check.py "$@"

"""Known-shift probe (brainsynth.deformation.known_shift): which D3M training formulation lets the deformer learn a
known misplacement? Writes probe.json beside this file. One thread:
OMP_NUM_THREADS=1 PYTHONPATH=common python ci/results/d3m_known_shift_probe/run_probe.py"""

import json
import time
from pathlib import Path

import torch

from brainsynth.deformation.known_shift import known_shift_probe
from brainsynth.engine.study import run_context

torch.set_num_threads(1)
arms = {
    "paper: warp the velocity, denoiser frozen": dict(warp_target="prediction"),
    "warp x0, denoiser frozen (second phase)": dict(warp_target="x0"),
    "paper: warp the velocity, trained jointly": dict(warp_target="prediction", trainable_denoiser=True),
    "warp x0, trained jointly": dict(warp_target="x0", trainable_denoiser=True),
}
results = {"context": run_context(), "shift_px": 3.0, "iterations": 400, "arms": {}}
for name, kwargs in arms.items():
    runs = []
    for seed in (0, 1, 2):
        start = time.perf_counter()
        r = known_shift_probe(3.0, iterations=400, seed=seed, log_every=40, **kwargs)
        r["seconds"] = round(time.perf_counter() - start, 1)
        r["seed"] = seed
        runs.append(r)
        print(name, seed, round(r["field_in_tumour_px"], 3), r["seconds"], "s", flush=True)
    results["arms"][name] = runs
Path(__file__).with_name("probe.json").write_text(json.dumps(results, indent=1))

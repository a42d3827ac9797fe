"""Tiny trained bundles shared by test modules: each bundle's smallest settings, trained once per test session
through MONAI's runner (``tiny_trained`` in conftest.py), so tests that need weights do not each train again."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import preforked_runner

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

#: per bundle: the tiny overlay (on top of the demo overlay) and the training stages, in order
TINY = {
    "brats_mri_med_ddpm": {
        "overlay": {
            "demo_cohort": {"n_subjects": 5, "spacing": 10.0, "seed": 0, "pathologies": ["glioblastoma"]},
            "spatial_size": [24, 24, 16],
            "channels": [8, 16],
            "attention_levels": [False, False],
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "batch_size": 2,
            "epoch_length": 2,
            "max_epochs": 1,
            "cache_rate": 0.0,
            "ema_start_step": 1,
            "sampler": "ddim",
            "num_inference_steps": 2,
            "progress": False,
        },
        "stages": [["train.json"]],
        "inference": ["train.json", "inference.json"],
    },
    "brats_mri_d3m_cemri": {
        "overlay": {
            "demo_cohort": {
                "n_subjects": 4,
                "seed": 0,
                "spacing": 6,
                "shape": [32, 32, 24],
                "pathologies": ["glioblastoma"],
            },
            "spatial_size": [32, 32],
            "channels": [16, 32],
            "attention_levels": [False, True],
            "num_res_blocks": 1,
            "num_head_channels": [16, 32],
            "norm_num_groups": 8,
            "deformer_features": [4, 4, 8, 8, 8, 4],
            "batch_size": 4,
            "slices_per_volume": 2,
            "epoch_length": 1,
            "max_epochs": 2,
            "ema_start_step": 0,
            "num_inference_steps": 3,
            # the demo's "idle" may differ between two runs a test compares exactly, and its bf16 depends on the CPU
            "num_threads": 1,
            "amp": False,
            "progress": False,
        },
        "stages": [["train.json"]],
        "inference": ["inference.json"],
    },
    "brain_mri_conditional_ldm": {
        "overlay": {
            "demo_cohort": {"n_subjects": 8, "spacing": 6.0, "seed": 0},
            "pixdim": [12.0, 12.0, 12.0],
            "spatial_size": [16, 16, 16],
            "ae_channels": [4, 8, 8],
            "ae_norm_num_groups": 4,
            "disc_channels": 4,
            "ae_batch_size": 4,
            "ae_epoch_length": 2,
            "ae_max_epochs": 1,
            "scale_factor_batches": 1,
            "condition_embedding_dim": 8,
            "unet_channels": [8, 16],
            "unet_num_head_channels": 8,
            "unet_norm_num_groups": 4,
            "diffusion_batch_size": 4,
            "diffusion_epoch_length": 2,
            "diffusion_max_epochs": 1,
            "num_inference_steps": 2,
            "batch_size": 2,
            "preview_every": 2,
            "preview_steps": 2,
            "progress": False,
        },
        "stages": [["train_autoencoder.json"], ["train_autoencoder.json", "train_diffusion.json"]],
        "inference": ["inference.json"],
    },
}


def config_list(bundle: str, configs: list[str], overlay: Path, extra: list[str] = ()) -> str:
    """The ``--config_file`` value: the bundle's configs, its demo overlay, the tiny overlay, then ``extra``
    configs (overlays such as multi_gpu_* go last, as documented)."""
    files = [f"configs/{c}" for c in configs] + ["configs/demo.json", str(overlay)]
    return repr(files + [f"configs/{c}" for c in extra])


def runner_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def runner_command(bundle, run_id, configs, overlay, root, *args, extra=(), launcher=()) -> list[str]:
    """``python -m monai.bundle run RUN_ID ...`` (or under ``launcher``, e.g. torchrun), run from the bundle."""
    return [
        *(launcher or [sys.executable]),
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config_list(bundle, configs, overlay, list(extra)),
        "--bundle_root",
        str(root),
        *map(str, args),
    ]


def run(bundle: str, run_id: str, configs: list[str], overlay: Path, root: Path, *args: str, extra=(), launcher=()):
    """Run ``runner_command`` from the bundle folder; a failure shows the end of its output."""
    cmd = runner_command(bundle, run_id, configs, overlay, root, *args, extra=extra, launcher=launcher)
    proc = preforked_runner.run(cmd, BUNDLES / bundle, runner_env(), timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_tiny(bundle: str, root: Path) -> tuple[Path, Path]:
    """Train ``bundle``'s tiny settings into ``root`` (models/ ...); returns (root, overlay file)."""
    spec = TINY[bundle]
    root.mkdir(parents=True, exist_ok=True)
    overlay = root / "tiny.json"
    overlay.write_text(json.dumps({**spec["overlay"], "cache_dir": str(root / "cache")}))
    for stage in spec["stages"]:
        run(bundle, "training", stage, overlay, root)
    return root, overlay


def copy_trained(root: Path, dest: Path) -> Path:
    """A private copy of a tiny trained bundle's ``models/`` and ``runs/`` (weights, checkpoints, logs) in
    ``dest``, for a test that trains on from the session's tiny training (a resume) without changing what other
    tests share. The cohort stays where the shared overlay's ``cache_dir`` points; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in ("models", "runs"):
        shutil.copytree(root / part, dest / part)
    return dest

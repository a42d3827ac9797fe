"""A training stopped after a checkpoint and started again ends bit-identical to the uninterrupted run of the same
seed (every bundle, CPU, tiny size): the checkpoint carries the random streams, the data order's position and the
data augmentation's state; stale temporary files of killed saves are removed on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brainsynth.engine.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_d3m_bundle as d3m  # noqa: E402
import test_ldm_bundle as ldm  # noqa: E402
import test_med_ddpm_bundle as med  # noqa: E402
from bundle_code import monai_run  # noqa: E402

# (bundle folder, train configs, tiny overlay, epoch keys, checkpoint path under bundle_root)
CASES = {
    "med_ddpm": (
        med.BUNDLE,
        ["configs/train.json", "configs/demo.json"],
        {**med.TINY, "epoch_length": 3},
        ("max_epochs",),
        "runs/train/checkpoint_last.pt",
    ),
    "med_ddpm_accumulation": (
        med.BUNDLE,
        ["configs/train.json", "configs/demo.json"],
        {**med.TINY, "epoch_length": 2, "accumulation_steps": 2, "batch_size": 1},
        ("max_epochs",),
        "runs/train/checkpoint_last.pt",
    ),
    "d3m": (
        d3m.BUNDLE,
        ["configs/train.json", "configs/demo.json"],
        {**d3m.TINY, "epoch_length": 3, "batch_size": 2, "slices_per_volume": 1},
        ("max_epochs",),
        "runs/d3m/checkpoint_last.pt",
    ),
    "ldm_autoencoder": (
        ldm.BUNDLE,
        ["configs/train_autoencoder.json", "configs/demo.json"],
        {**ldm.TINY, "ae_epoch_length": 3, "ae_batch_size": 3, "adversarial_start_iteration": 2},
        ("ae_max_epochs",),
        "runs/autoencoder/checkpoint_last.pt",
    ),
    "ldm_diffusion": (
        ldm.BUNDLE,
        ["configs/train_autoencoder.json", "configs/train_diffusion.json", "configs/demo.json"],
        {**ldm.TINY, "diffusion_epoch_length": 3, "diffusion_batch_size": 3, "ema_start_step": 2},
        ("diffusion_max_epochs",),
        "runs/diffusion/checkpoint_last.pt",
    ),
}
#: stages a case builds on, trained first (identically) into both runs' folders
PREREQUISITES = {"ldm_diffusion": (["configs/train_autoencoder.json", "configs/demo.json"], ("ae_max_epochs",))}


def _train(bundle, configs, overlay_path, root, epochs, epoch_keys):
    args = [arg for key in epoch_keys for arg in (f"--{key}", str(epochs))]
    proc = monai_run(bundle, "training", [*configs, overlay_path], "--bundle_root", root, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


#: the default suite resumes one diffusion trainer per kind (Med-DDPM's 3D, D3M's 2D with slice sampling); the
#: LDM stages and gradient accumulation repeat the same machinery at a minute each: opt-in (-m slow)
DEFAULT_CASES = ("med_ddpm", "d3m")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in DEFAULT_CASES else [pytest.mark.slow]) for n in CASES]
)
def test_stop_and_resume_equals_the_uninterrupted_run(name, tmp_path):
    bundle, configs, tiny, epoch_keys, ckpt = CASES[name]
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**tiny, "cache_dir": str(tmp_path / "cache"), "save_every_epochs": 1}))
    for root in ("whole", "resumed"):
        if name in PREREQUISITES:
            _train(bundle, PREREQUISITES[name][0], overlay, tmp_path / root, 1, PREREQUISITES[name][1])
    # uninterrupted: 3 epochs
    _train(bundle, configs, overlay, tmp_path / "whole", 3, epoch_keys)
    # stopped after the first and after the second epoch's checkpoint (two kill points, each mid-way through a pass
    # over the data; with accumulation, a kill inside the next accumulation phase resumes from the same
    # checkpoint), each time resumed; a killed save left a temporary file that the resume removes
    _train(bundle, configs, overlay, tmp_path / "resumed", 1, epoch_keys)
    stale = (tmp_path / "resumed" / ckpt).parent / ".checkpoint_last.abc123.tmp.pt"
    stale.write_bytes(b"partial")
    log = _train(bundle, configs, overlay, tmp_path / "resumed", 2, epoch_keys)
    assert "resumed from" in log and not stale.exists()
    log = _train(bundle, configs, overlay, tmp_path / "resumed", 3, epoch_keys)
    assert "resumed from" in log
    whole, resumed = load_checkpoint(tmp_path / "whole" / ckpt), load_checkpoint(tmp_path / "resumed" / ckpt)
    length = tiny[epoch_keys[0].replace("max_epochs", "epoch_length")]
    assert whole["trainer"]["iteration"] == resumed["trainer"]["iteration"] == 3 * length
    weights = [part for part in whole if part not in ("trainer", "rng") and "optim" not in part]
    assert {"network", "autoencoder"} & set(weights)
    for part in weights:  # the networks (generator, discriminator), EMA, augmentation state
        assert _flat(whole[part]).keys() == _flat(resumed[part]).keys()
        differing = [k for k, v in _flat(whole[part]).items() if not torch.equal(v, _flat(resumed[part])[k])]
        assert not differing, f"{name} {part}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def _flat(state, prefix=""):
    """Every tensor of a (nested) state dict, by path."""
    out = {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    for k, v in items:
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        else:
            out.update(_flat(v, f"{prefix}{k}."))
    return out


def test_one_training_per_checkpoint_folder(tmp_path):
    """A folder held by a live training refuses a second one before any work; a dead holder's lock is taken over."""
    import socket

    from brainsynth.engine.training import TrainingLock

    bundle, configs, tiny, epoch_keys, ckpt = CASES["med_ddpm"]
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**tiny, "cache_dir": str(tmp_path / "cache")}))
    folder = (tmp_path / "run" / ckpt).parent
    folder.mkdir(parents=True)
    lock = folder / ".training.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))  # alive
    proc = monai_run(bundle, "training", [*configs, overlay], "--bundle_root", tmp_path / "run")
    assert proc.returncode != 0 and f"PID {os.getpid()}" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # the problem and the fix, not MONAI's "Failed to evaluate"
    assert last.startswith("error: ") and "another training is using this checkpoint folder" in last, last
    assert not (folder / "checkpoint_last.pt").exists() and not (folder / "model.pt").exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "earlier"}))
    taker = TrainingLock(folder)
    taker.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match="another training is using this checkpoint folder"):
        TrainingLock(folder).acquire()
    taker.release()
    assert not lock.exists()

"""Expected errors through MONAI's runner end with the problem and the fix in plain words: the last line of stderr
is ``error: <the project's own message>``, after the full traceback (kept for diagnosis)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from brainsynth.engine.io import save_nifti

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_med_ddpm_bundle as med  # noqa: E402
from bundle_code import monai_run  # noqa: E402


def _last_line(args, tmp_path, configs=("configs/inference.json", "configs/demo.json")):
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**med.TINY, "cache_dir": str(tmp_path / "cache")}))
    run_id = "training" if "configs/train.json" in configs else "inference"
    proc = monai_run(med.BUNDLE, run_id, [*configs, overlay], "--bundle_root", tmp_path / "run", *args)
    assert proc.returncode != 0
    stderr = proc.stderr.strip()
    assert "\nerror: " in stderr, stderr[-3000:]
    tail = stderr[stderr.rindex("\nerror: ") + 1 :]  # the message closes the output (it may span lines)
    assert "Traceback" not in tail and 'File "' not in tail, tail
    return tail


def test_misspelled_override(tmp_path):
    last = _last_line(["--max_epoch", "5"], tmp_path, ("configs/train.json", "configs/demo.json"))
    assert last.startswith("error: ") and "max_epoch" in last and "max_epochs" in last, last


def test_missing_dataset(tmp_path):
    last = _last_line(["--dataset_dir", str(tmp_path / "no_such_data")], tmp_path)
    assert last.startswith("error: ") and "no_such_data" in last and "does not exist" in last, last


@pytest.mark.parametrize("bad", ["labels", "raw_brats2021"])
def test_bad_condition_mask(tmp_path, bad):
    masks = tmp_path / "masks"
    lm = np.zeros((24, 24, 16), np.int16)
    lm[4:20, 4:20, 2:14] = 4  # brain
    lm[10:14, 10:14, 6:10] = 2  # edema
    if bad == "labels":
        lm[11, 11, 8] = 9  # not a label of this model
    else:
        lm = np.where(lm == 4, 0, lm)  # tumour labels without the brain around them
        lm[10:12, 10:12, 6:8] = 4
    save_nifti(lm, masks / "case.nii.gz", dtype=np.int16)
    last = _last_line(["--dataset_dir", str(masks)], tmp_path)
    assert last.startswith("error: ") and "case.nii.gz" in last, last


def test_implausible_mask_spacing(tmp_path):
    masks = tmp_path / "masks"
    lm = np.zeros((24, 24, 16), np.int16)
    lm[4:20, 4:20, 2:14] = 4
    lm[10:14, 10:14, 6:10] = 2
    save_nifti(lm, masks / "case.nii.gz", affine=np.diag([750.0, 750.0, 750.0, 1.0]), dtype=np.int16)
    last = _last_line(["--dataset_dir", str(masks)], tmp_path)
    assert "case.nii.gz" in last and "outside the plausible" in last, last


def test_refused_weights(tmp_path):
    """A model.pt that does not match its sha256 record: the run stops naming the file, before any sampling."""
    import torch

    from brainsynth.engine.io import hash_record_path, save_checkpoint

    models = tmp_path / "run" / "models"
    weights = save_checkpoint({"x": torch.zeros(3)}, models / "model.pt", record=True)
    hash_record_path(weights).write_text("0" * 64 + "  model.pt\n")
    last = _last_line([], tmp_path)
    assert last.startswith("error: ") and "model.pt: sha256" in last and "does not match its record" in last, last

"""Synthetic scans are marked (header + sidecar), the mark survives losing the sidecar, the data layer reports it,
evaluations refuse synthetic files as real data, and no patient field reaches a record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsynth.data import DatasetError, write_dicom_series
from brainsynth.data.provenance import (
    MARKER,
    RunProvenance,
    count_synthetic,
    is_synthetic,
    read_provenance,
    refuse_synthetic,
    sha256_file,
    sidecar_path,
)
from brainsynth.engine.io import save_nifti

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_mri_med_ddpm"


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    return path


def _record(weights, **conditions):
    run = RunProvenance(BUNDLE, weights=weights, sampler="ddim", num_inference_steps=25, seed=7)
    return run, run.record(conditions or {"mask_sha256": "0" * 64})


def test_a_marked_volume_carries_header_and_sidecar_matching_the_run(tmp_path, weights):
    run, record = _record(weights, pathology="sclerosis", modality="t1ce")
    out = save_nifti(np.random.rand(4, 5, 6), tmp_path / "gen.nii.gz", provenance=record)
    header = nib.load(str(out)).header
    descrip = header["descrip"].tobytes().split(b"\0")[0].decode()
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert descrip == f"{MARKER} brats_mri_med_ddpm {meta['version']}"
    assert header["intent_name"].tobytes().split(b"\0")[0] == b"synthetic"
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar_path(out).name == "gen.json"
    assert sidecar["synthetic"] is True and sidecar["bundle"] == "brats_mri_med_ddpm"
    assert sidecar["bundle_name"] == meta["name"] and sidecar["bundle_version"] == meta["version"]
    assert sidecar["weights_sha256"] == sha256_file(weights)
    assert sidecar["seed"] == 7 and sidecar["num_inference_steps"] == 25 and sidecar["sampler"] == "ddim"
    assert sidecar["conditions"] == {"pathology": "sclerosis", "modality": "t1ce"}
    assert {"torch", "monai", "brainsynth", "python"} <= set(sidecar["software"])
    assert read_provenance(out)["source"] == "sidecar"


def test_the_header_alone_still_says_synthetic_after_the_sidecar_is_lost(tmp_path, weights):
    _, record = _record(weights)
    out = save_nifti(np.zeros((3, 3, 3)), tmp_path / "a" / "gen.nii.gz", provenance=record)
    copy = tmp_path / "b" / "copied.nii.gz"
    copy.parent.mkdir()
    shutil.copy(out, copy)  # a copy without its sidecar
    found = read_provenance(copy)
    assert found["source"] == "header" and found["bundle"] == "brats_mri_med_ddpm" and is_synthetic(copy)
    real = save_nifti(np.zeros((3, 3, 3)), tmp_path / "real.nii.gz")
    assert read_provenance(real) is None and not is_synthetic(real)


def test_reference_free_text_fields_are_not_copied_into_outputs(tmp_path):
    ref = nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4))
    ref.header["descrip"] = b"Doe^Jane 1970-01-01"
    ref.header["aux_file"] = b"MRN12345"
    nib.save(ref, str(tmp_path / "ref.nii.gz"))
    out = save_nifti(np.ones((3, 3, 3)), tmp_path / "out.nii.gz", reference=tmp_path / "ref.nii.gz")
    raw = (tmp_path / "out.nii.gz").read_bytes()
    import gzip

    assert b"Doe^Jane" not in gzip.decompress(raw) and b"MRN12345" not in gzip.decompress(raw)
    assert not is_synthetic(out)


def test_evaluation_refuses_synthetic_files_in_real_data_naming_them(tmp_path, weights):
    _, record = _record(weights)
    real = save_nifti(np.zeros((3, 3, 3)), tmp_path / "s1_t1.nii.gz")
    fake = save_nifti(np.zeros((3, 3, 3)), tmp_path / "s2_t1.nii.gz", provenance=record)
    rows = [{"subject": "s1", "t1w": str(real)}, {"subject": "s2", "t1w": str(fake)}]
    assert count_synthetic(rows) == {"synthetic": 1, "real": 1}
    with pytest.raises(DatasetError) as err:
        refuse_synthetic(rows, "the held-out test split")
    assert str(err.value).startswith(str(fake)) and "held-out test split" in str(err.value)
    assert refuse_synthetic(rows[:1]) == rows[:1]


def test_data_check_and_the_provenance_cli_report_a_mixed_folder(tmp_path, weights):
    from brainsynth.cohort import generate_cohort

    cohort = tmp_path / "cohort"
    generate_cohort(cohort, n_subjects=2, seed=0, spacing=12.0, layout="brats2023", pathologies=["glioblastoma"])
    subject = sorted(p for p in cohort.iterdir() if p.is_dir())[0]
    t1 = next(subject.glob("*-t1n.nii.gz"))
    _, record = _record(weights)
    img = nib.load(str(t1))
    data = np.asarray(img.dataobj)
    t1.unlink()
    save_nifti(data, t1, reference=img, provenance=record)  # one subject's T1 is now synthetic
    env = {"PYTHONWARNINGS": "ignore"}
    check = subprocess.run(
        [sys.executable, "-m", "brainsynth.data", "check", str(cohort)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, **env},
    )
    lines = check.stdout.splitlines()
    flagged = [line for line in lines if "SYNTHETIC" in line]
    assert len(flagged) == 1 and subject.name in flagged[0], check.stdout
    assert "1 synthetic subject (brainsynth provenance mark)" in lines, check.stdout
    cli = [sys.executable, "-m", "brainsynth.data", "provenance"]
    synthetic = subprocess.run(cli + [str(t1)], capture_output=True, text=True, timeout=120)
    assert (
        synthetic.returncode == 0 and "SYNTHETIC" in synthetic.stdout and record["weights_sha256"] in synthetic.stdout
    )
    mixed = subprocess.run(cli + [str(subject)], capture_output=True, text=True, timeout=120)
    assert mixed.returncode == 1 and "NOT MARKED" in mixed.stdout
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    unreadable = subprocess.run(cli + [str(broken)], capture_output=True, text=True, timeout=120)
    assert unreadable.returncode == 2 and str(broken) in unreadable.stdout


def test_no_dicom_patient_field_reaches_a_record(tmp_path, weights):
    """A D3M synthesis from DICOM input: its records hold the inputs' hashes, never names, IDs or dates."""
    import pydicom

    sys.path.insert(0, str(REPO / "tests"))
    from bundle_code import bundle_scripts

    slices = bundle_scripts("brats_mri_d3m_cemri", "slices")
    inputs = {}
    for key in ("t1w", "t2w", "flair"):
        folder = write_dicom_series(np.random.rand(6, 6, 4) * 100, np.eye(4), tmp_path / f"Doe_Jane_{key}")
        for f in folder.iterdir():  # as a scanner would have written them
            ds = pydicom.dcmread(f)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN12345", "19700101"
            ds.save_as(f)
        inputs[key] = str(folder)
    saver = slices.SaveSynthesisd(
        "pred",
        tmp_path / "out",
        reference_key="t1w",
        save_uncertainty=True,
        provenance={"weights": str(weights), "seed": 3},
    )
    from monai.data import MetaTensor

    pred = MetaTensor(torch.rand(3, 6, 6, 4) * 2 - 1, affine=torch.eye(4))
    saver({"pred": pred, "subject": "Doe_Jane", **inputs})
    sidecars = sorted((tmp_path / "out").rglob("*.json"))  # <out>/<subject>/...
    assert len(sidecars) == 3
    for sidecar in sidecars:
        text = sidecar.read_text()
        assert "Doe" not in text and "MRN12345" not in text and "19700101" not in text
        record = json.loads(text)
        assert set(record["conditions"]) == {"input_modalities", "t1w_sha256", "t2w_sha256", "flair_sha256"}
        assert record["seed"] == 3 and record["bundle"] == "brats_mri_d3m_cemri"


def test_a_non_finite_generation_is_never_written(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from bundle_code import bundle_scripts
    from monai.data import MetaTensor

    slices = bundle_scripts("brats_mri_d3m_cemri", "slices")
    pred = torch.zeros(3, 4, 4, 4)
    pred[0, 1, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="s1: the synthesis is not finite"):
        slices.SaveSynthesisd("pred", tmp_path / "out")({"pred": MetaTensor(pred), "subject": "s1"})
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

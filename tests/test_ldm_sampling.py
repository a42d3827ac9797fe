"""Conditional LDM sampling pieces: requests, per-volume seeds, safe outputs, per-combination evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)

from brainsynth.conditioning.categorical import CategoricalConditioning
from brainsynth.conventions import MODALITIES, PATHOLOGIES
from brainsynth.engine.io import OutputExistsError

bundle_scripts("brain_mri_conditional_ldm")  # the bundle's own code, importable as brain_mri_conditional_ldm_scripts
from brain_mri_conditional_ldm_scripts.latent_sampling import (  # noqa: E402
    NoisePrepareBatch,
    SampleMontage,
    SaveGeneratedd,
    check_output_dir,
    condition_requests,
    evaluate_conditions,
    pixdim_affine,
)

VOCAB = {"pathology": list(PATHOLOGIES), "modality": list(MODALITIES)}
REPO_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_conditional_ldm"


@pytest.fixture()
def cond():
    torch.set_num_threads(1)
    return CategoricalConditioning(VOCAB, 4)


def test_requests_for_one_combination_and_for_the_whole_grid(cond):
    rows = condition_requests(cond, "MS", "T1gd", num_samples=3, seed=7)
    assert [r["name"] for r in rows] == ["sclerosis_t1ce_000", "sclerosis_t1ce_001", "sclerosis_t1ce_002"]
    assert all(r["condition"].tolist() == [2, 1] for r in rows)
    assert len({r["seed"] for r in rows}) == 3
    grid = condition_requests(cond, grid=True, num_samples=2)
    assert len(grid) == 4 * 5 * 2
    assert {(r["pathology"], r["modality"]) for r in grid} == {(p, m) for p in PATHOLOGIES for m in MODALITIES}
    # a condition may be left open ("any"): it is the null token
    open_rows = condition_requests(cond, None, "pd")
    assert open_rows[0]["condition"].tolist() == [-1, 4] and open_rows[0]["name"] == "any_pd_000"


def test_unknown_names_fail_before_sampling_with_the_valid_list(cond):
    with pytest.raises(ValueError, match="unknown modality 'dwi'; valid: t1w, t1ce, t2w, flair, pd"):
        condition_requests(cond, "healthy", "dwi")
    with pytest.raises(ValueError, match="unknown pathology 'stroke'; valid: healthy, glioblastoma, sclerosis"):
        condition_requests(cond, "stroke", "t1w")
    with pytest.raises(ValueError, match="num_samples"):
        condition_requests(cond, "healthy", "t1w", num_samples=0)


def test_noise_depends_only_on_each_volume_seed_not_on_the_batch(cond):
    rows = condition_requests(cond, grid=True)[:4]
    prep = NoisePrepareBatch([3, 4, 4, 4])
    batch = {"seed": torch.tensor([r["seed"] for r in rows]), "condition": torch.stack([r["condition"] for r in rows])}
    noise, target, args, kwargs = prep(batch)
    single, _, _, _ = prep({"seed": torch.tensor([rows[2]["seed"]]), "condition": rows[2]["condition"][None]})
    assert noise.shape == (4, 3, 4, 4, 4) and target is None
    assert torch.equal(noise[2], single[0])
    assert not torch.equal(noise[0], noise[1])
    assert torch.equal(kwargs["conditioning"], batch["condition"])


def test_generated_volumes_are_written_atomically_and_never_replace_earlier_ones(tmp_path, cond):
    save = SaveGeneratedd("pred", tmp_path, pixdim=(6.0, 6.0, 6.0))
    out = save({"pred": torch.rand(1, 8, 8, 8), "name": "healthy_t1w_000"})
    img = nib.load(out["pred_path"])
    assert img.shape == (8, 8, 8) and np.allclose(img.header.get_zooms(), 6.0)
    assert np.allclose(img.affine, pixdim_affine((6.0, 6.0, 6.0), (8, 8, 8)))
    with pytest.raises(OutputExistsError):
        save({"pred": torch.rand(1, 8, 8, 8), "name": "healthy_t1w_000"})
    rows = condition_requests(cond, "healthy", "t1w", num_samples=2)
    with pytest.raises(FileExistsError, match="healthy_t1w_000.nii.gz"):
        check_output_dir(tmp_path, rows)
    check_output_dir(tmp_path, rows, overwrite=True)
    check_output_dir(tmp_path / "new", rows)


class _ToyExtractor:
    """Feature = mean intensity and its square; 'recognises' glioblastoma when a volume is bright."""

    name = "toy features"
    has_heads = True
    validation = {"pathology_accuracy": 1.0}

    def extract(self, volumes):
        v = torch.as_tensor(np.asarray(volumes)).reshape(len(volumes), -1).double()
        m = v.mean(1, keepdim=True)
        return torch.cat([m, m**2 + 0.01 * v.std(1, keepdim=True)], 1)

    def classify(self, volumes):
        means = [float(np.mean(v)) for v in volumes]
        return {
            "pathology": ["glioblastoma" if m > 0.5 else "healthy" for m in means],
            "modality": ["t1w"] * len(means),
        }


def test_evaluation_per_combination_marks_held_out_and_writes_a_table(tmp_path, cond):
    rng = np.random.default_rng(0)
    requests = condition_requests(cond, combinations=[["glioblastoma", "t1w"], ["healthy", "t1w"]], num_samples=3)
    gen_dir = tmp_path / "generated"
    for r in requests:
        level = 0.8 if r["pathology"] == "glioblastoma" else 0.2
        nib.save(
            nib.Nifti1Image((level + 0.05 * rng.random((12, 12, 12))).astype(np.float32), np.eye(4)),
            gen_dir.mkdir(exist_ok=True) or gen_dir / f"{r['name']}.nii.gz",
        )
    real_rows = []
    for i, (p, level) in enumerate([("glioblastoma", 0.7), ("glioblastoma", 0.75), ("healthy", 0.3)]):
        real_rows.append({"image": rng.random((1, 12, 12, 12)) * 0.1 + level, "pathology": p, "modality": "t1w"})
    report = evaluate_conditions(
        requests, gen_dir, real_rows, lambda row: row, _ToyExtractor(), [["glioblastoma", "t1w"]], tmp_path / "eval"
    )
    by = {(e["pathology"], e["modality"]): e for e in report["combinations"]}
    gbm, healthy = by[("glioblastoma", "t1w")], by[("healthy", "t1w")]
    assert gbm["split"] == "held-out" and healthy["split"] == "seen"
    assert gbm["n_generated"] == 3 and gbm["n_real"] == 2 and healthy["n_real"] == 1
    assert gbm["conditioning_pathology_accuracy"] == 1.0 and healthy["conditioning_pathology_accuracy"] == 1.0
    assert gbm["conditioning_joint_accuracy"] == 1.0
    assert "feature_frechet_distance" in gbm and gbm["feature_frechet_distance"] >= 0.0
    assert "feature_frechet_distance" not in healthy and "note" in healthy  # one real scan: no distance
    assert 0.0 <= gbm["diversity_ms_ssim"] <= 1.0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["feature_network"] == "toy features" and saved["feature_network_validation"]
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "Frechet distance (toy features features)" in table and "| glioblastoma | t1w | held-out |" in table
    assert "FID" not in table
    with pytest.raises(FileExistsError):
        evaluate_conditions(requests, gen_dir, real_rows, lambda row: row, _ToyExtractor(), [], tmp_path / "eval")


def test_the_montage_shows_every_requested_sample(tmp_path, monkeypatch):
    """--num_samples 4 writes 4 volumes per combination; the montage must show all 4 (it showed 2)."""
    from types import SimpleNamespace

    from monai.bundle import ConfigParser

    from brainsynth.engine import preview

    parser = ConfigParser()
    parser.read_config(str(REPO_BUNDLE / "configs" / "inference.json"))
    parser.update({"num_samples": 4, "output_dir": str(tmp_path)})
    assert parser.get_parsed_content("montage_writer#max_per_cell") == 4
    montage = SampleMontage(tmp_path / "m.png", max_per_cell=4)
    batch = [{"pathology": "glioblastoma", "modality": "t1w"}] * 4
    montage.collect(SimpleNamespace(state=SimpleNamespace(batch=batch, output=[{"pred": torch.rand(1, 8, 8, 8)}] * 4)))
    shown = {}
    monkeypatch.setattr(preview, "save_montage", lambda subjects, path, **kw: shown.setdefault("rows", len(subjects)))
    montage.write()
    assert shown["rows"] == 4

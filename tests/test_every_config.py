"""Every shipped config runs, at the tiny size, with a check of what it writes: the D3M ablation and baseline
overlays, each bundle's evaluate.json, Med-DDPM's single-modality and mask-augmentation overlays, and the two
measurement harnesses (ci/sampler_quality.py, ci/benchmark.py) in a tiny mode. (Training and inference configs
themselves run in tests/test_verify_bundles.py, the multi-GPU overlays in test_multi_gpu.py / test_scaling_out.py.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_bundles import REPO, TINY, run, runner_env

sys.path.insert(0, str(REPO / "ci"))
from gpu_check import numbers_in as _numbers  # noqa: E402  (ci/ is not a package)


def _check_synthesis(folder: Path, suffix: str, varied: bool = True) -> None:
    """Each written volume: finite, in [0, 1], with signal, and (``varied``) not flat where it has signal."""
    volumes = sorted(folder.rglob(f"*{suffix}"))
    assert volumes, f"nothing named *{suffix} under {folder}"
    for path in volumes:
        data = nib.load(path).get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0, path
        assert (data > 0).any(), f"{path}: nothing generated"
        assert not varied or data[data > 0].std() > 0.005, f"{path}: flat synthesis"


@pytest.mark.parametrize("variant", ["no_mssdm.json", "no_dsimd.json", "palette.json"])
def test_d3m_ablation_and_baseline_overlays_train_and_synthesise(variant, tmp_path):
    bundle = "brats_mri_d3m_cemri"
    root = tmp_path / "run"
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**TINY[bundle]["overlay"], "cache_dir": str(tmp_path / "cache"), "max_epochs": 1}))
    run(bundle, "training", ["train.json"], overlay, root, extra=[variant])
    run(bundle, "inference", ["inference.json"], overlay, root, extra=[variant])
    config = json.loads((REPO / "bundles" / bundle / "configs" / variant).read_text())
    folder = root / "outputs" / config["variant"]
    _check_synthesis(folder, "-t1c.nii.gz")
    masks = list(folder.rglob("*enhancing_predicted.nii.gz"))
    assert bool(masks) == config.get("mask_stream", True), f"{variant}: mask files {masks}"


def test_d3m_x0_deformer_overlay_trains_only_the_deformer_on_the_no_mssdm_denoiser(tmp_path):
    """The working deformation's second phase: the no_mssdm model's denoiser is loaded and frozen, so the final
    x0_deformer model holds exactly that denoiser beside a trained deformer, and it synthesises."""
    import torch

    bundle = "brats_mri_d3m_cemri"
    root = tmp_path / "run"
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**TINY[bundle]["overlay"], "cache_dir": str(tmp_path / "cache"), "max_epochs": 1}))
    run(bundle, "training", ["train.json"], overlay, root, extra=["no_mssdm.json"])
    run(bundle, "training", ["train.json"], overlay, root, extra=["x0_deformer.json"])
    first = torch.load(root / "models" / "model_no_mssdm.pt", weights_only=True)
    second = torch.load(root / "models" / "model_x0_deformer.pt", weights_only=True)
    assert set(first) < set(second) and any(k.startswith("deformer.") for k in second)
    for key, value in first.items():
        assert torch.equal(second[key], value), f"{key}: the frozen denoiser changed"
    run(bundle, "inference", ["inference.json"], overlay, root, extra=["x0_deformer.json"])
    _check_synthesis(root / "outputs" / "x0_deformer", "-t1c.nii.gz")


@pytest.mark.parametrize(
    "overlay",
    ["no_mssdm.json", "no_dsimd.json", "palette.json", "x0_deformer.json", "study_cpu.json", "cpu_experiment.json"],
)
def test_d3m_variant_and_scale_overlays_set_only_keys_the_bundle_defines(overlay):
    """An overlay key that no base config defines would be silently added by MONAI's parser (a typo trains with the
    default); variant and scale overlays may only change existing settings."""
    configs = REPO / "bundles" / "brats_mri_d3m_cemri" / "configs"
    known = set()
    for base in ("train.json", "inference.json", "evaluate.json", "demo.json"):
        known |= set(json.loads((configs / base).read_text()))
    keys = [k for k in json.loads((configs / overlay).read_text()) if not k.startswith("_")]
    assert keys and not [k for k in keys if k.split("#")[0] not in known], overlay


def test_every_d3m_config_is_named_by_a_test():
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("*.py"))
    configs = sorted((REPO / "bundles" / "brats_mri_d3m_cemri" / "configs").glob("*.json"))
    assert configs and not [p.name for p in configs if f'"{p.name}"' not in tests and f"'{p.name}'" not in tests]


def test_d3m_evaluate_writes_finite_metrics(tiny_trained, tmp_path):
    bundle = "brats_mri_d3m_cemri"
    root, overlay = tiny_trained(bundle)
    eval_dir = tmp_path / "eval"
    run(bundle, "evaluating", ["inference.json", "evaluate.json"], overlay, root, "--eval_dir", eval_dir)
    import csv

    tables = sorted(eval_dir.glob("*_per_slice.csv")) + sorted(eval_dir.glob("*_per_volume.csv"))
    assert len(tables) == 2, f"evaluate.json wrote {sorted(p.name for p in eval_dir.iterdir())}"
    for table in tables:
        rows = list(csv.DictReader(table.open()))
        assert rows, f"{table}: no rows"
        for row in rows:
            for key, value in row.items():
                if "ssim" in key.lower() and value not in ("", None):
                    assert -1.0 <= float(value) <= 1.0, (table.name, key, value)
                if "psnr" in key.lower() and value not in ("", None):
                    assert math.isfinite(float(value)), (table.name, key, value)


def test_ldm_evaluate_writes_conditioning_and_distance_tables(tiny_trained, tmp_path):
    bundle = "brain_mri_conditional_ldm"
    root, overlay = tiny_trained(bundle)
    eval_dir = tmp_path / "eval"
    run(
        bundle,
        "evaluating",
        ["inference.json", "evaluate.json"],
        overlay,
        root,
        "--eval_dir",
        eval_dir,
        "--output_dir",
        tmp_path / "generated",
        "--eval_num_samples",
        2,
        "--feature_network_epochs",
        1,
        "--feature_network_input_shape",
        "[16, 16, 16]",
    )
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    values = _numbers(metrics)
    assert len(values) > 5 and all(math.isfinite(x) for x in values)
    assert (eval_dir / "metrics.md").read_text().count("|") > 10


def test_med_ddpm_single_modality_overlay_trains_and_generates(tmp_path):
    bundle = "brats_mri_med_ddpm"
    root = tmp_path / "run"
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps({**TINY[bundle]["overlay"], "cache_dir": str(tmp_path / "cache")}))
    # the overlay goes right after train.json / inference.json, as documented; the tiny sizes then apply
    run(bundle, "training", ["train.json", "single_modality.json"], overlay, root)
    run(
        bundle,
        "inference",
        ["train.json", "inference.json", "single_modality.json"],
        overlay,
        root,
        "--split",
        "test",
    )
    modalities = json.loads((REPO / "bundles" / bundle / "configs" / "single_modality.json").read_text())["modalities"]
    assert len(modalities) == 1
    from brainsynth.conventions import layout_file_name

    suffix = layout_file_name("", modalities[0], "brats2023")  # the demo cohort's naming
    _check_synthesis(root / "outputs", suffix, varied=False)  # two training steps may saturate: not checked
    for folder in (root / "outputs").iterdir():
        generated = [p for p in folder.glob("*.json") if p.name != "manifest.json"]
        assert len(generated) == 1, f"{folder}: {generated}: one generated modality per subject"
        volume = nib.load(generated[0].with_suffix(".nii.gz")).get_fdata()
        head = nib.load(next(folder.glob("*-condition.nii.gz"))).get_fdata() > 0
        assert np.all(volume[~head] == 0.0), f"{folder}: outside the head is not black"


def test_med_ddpm_mask_augmentation_writes_scaled_masks_inside_the_brain(tiny_trained, tmp_path):
    bundle = "brats_mri_med_ddpm"
    root, overlay = tiny_trained(bundle)
    out = tmp_path / "augmented"
    run(
        bundle,
        "augmenting",
        ["train.json", "inference.json"],
        overlay,
        root,
        "--augment_dir",
        out,
        "--augment_per_subject",
        2,
        "--split",
        "training",
        extra=["augment_masks.json"],
    )
    datalist = json.loads((out / "datalist.json").read_text())
    rows = datalist["augmented"]
    assert len(rows) >= 2
    for row in rows:
        seg = np.asarray(nib.load(out / row["seg"]).dataobj)
        brain = np.asarray(nib.load(row["brain_mask"]).dataobj) > 0
        tumour = seg > 0
        assert tumour.any(), f"{row['seg']}: no tumour"
        assert np.all(brain[tumour]), f"{row['seg']}: tumour voxels outside the brain"
        assert 0.5 <= row["scale"] <= 2.0, row


def test_sampler_quality_and_benchmark_harnesses_run_tiny(tiny_trained, tmp_path):
    root, overlay = tiny_trained("brats_mri_med_ddpm")
    bundle_dir = REPO / "bundles" / "brats_mri_med_ddpm"
    out = tmp_path / "quality"
    cmd = [
        sys.executable,
        str(REPO / "ci" / "sampler_quality.py"),
        "--bundle",
        "brats_mri_med_ddpm",
        "--bundle_root",
        str(root),
        "--config_file",
        str(bundle_dir / "configs" / "train.json"),
        str(bundle_dir / "configs" / "inference.json"),
        str(bundle_dir / "configs" / "demo.json"),
        str(overlay),
        "--run_id",
        "inference",
        "--specs",
        "ddim:4,ddim:2",
        "--reference",
        "ddim:4",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=runner_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "sampler_quality.json").read_text())
    text = json.dumps(result)
    assert "ddim:2" in text and "ddim:4" in text
    assert all(math.isfinite(x) for x in _numbers(result))

    bench = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(REPO / "ci" / "benchmark.py"),
        "--bundle",
        "brats_mri_med_ddpm",
        "--size",
        "demo",
        "--measure",
        "train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--set",
        "channels=[8, 16]",
        "--set",
        "attention_levels=[false, false]",
        "--set",
        "spatial_size=[24, 24, 16]",
        "--out",
        str(bench),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=runner_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in bench.glob("*.json")]
    assert results, "the benchmark wrote no JSON"
    seconds = [x for r in results for x in _numbers(r)]
    assert any(x > 0 for x in seconds) and all(math.isfinite(x) for x in seconds)

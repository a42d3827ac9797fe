"""The Med-DDPM bundle end to end through ``python -m monai.bundle run`` on a tiny simulated cohort: train, resume
from the checkpoint with the step count continuing, sample, outputs in the mask's geometry; bad masks rejected
with a clear error before any work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import preforked_runner
import pytest
import torch
from tiny_bundles import TINY as TINY_BUNDLES
from tiny_bundles import copy_trained

from brainsynth.conditioning.semantic_mask import BRATS_CLASSES, MaskError, SemanticMaskConditioning
from brainsynth.data import DatasetError, discover, resolve_dataset_dir, split_items
from brainsynth.data.provenance import MARKER, read_provenance, sha256_file
from brainsynth.engine.io import load_checkpoint, save_nifti

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_med_ddpm"
# a 24 x 24 x 16 grid (the 10 mm cohort's) and a two-level U-Net: seconds per run on one core (tests/tiny_bundles.py)
COHORT = TINY_BUNDLES["brats_mri_med_ddpm"]["overlay"]["demo_cohort"]
TINY = {
    **TINY_BUNDLES["brats_mri_med_ddpm"]["overlay"],
    "dataset_dir": "demo",
    "num_workers": 0,
    "progress": False,
    "split": "test",
}


def _scripts():
    """The bundle's scripts/inputs.py (every bundle has a ``scripts`` package: see tests/bundle_code.py)."""
    from bundle_code import bundle_scripts

    return bundle_scripts("brats_mri_med_ddpm", "inputs")


@pytest.fixture(scope="module")
def workspace(tiny_trained, tmp_path_factory):
    """The session's tiny Med-DDPM training (tests/tiny_bundles.py: one epoch of 2 iterations through the runner)
    copied into this module's run folder, its cohort, and an overlay with the tiny settings and that folder."""
    trained, _ = tiny_trained("brats_mri_med_ddpm")
    root = tmp_path_factory.mktemp("med_ddpm")
    cohort = resolve_dataset_dir("demo", trained / "cache", **COHORT)  # the cohort the tiny training used
    copy_trained(trained, root / "run")
    overlay = root / "tiny.json"
    overlay.write_text(
        json.dumps(
            {
                **TINY,
                "cache_dir": str(trained / "cache"),
                "bundle_root": str(root / "run"),
                "output_dir": str(root / "run" / "outputs"),
            }
        )
    )
    return root, cohort, overlay


def _run(run_id, configs, *args, expect_ok=True):
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(list(configs)), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = preforked_runner.run(cmd, BUNDLE, env)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def test_train_resume_sample_end_to_end(workspace):
    root, cohort, overlay = workspace
    train = ["configs/train.json", "configs/demo.json", str(overlay)]
    # the first training is the session's tiny one (the workspace's copy of it)
    ckpt_path = root / "run" / "runs" / "train" / "checkpoint_last.pt"
    first = load_checkpoint(ckpt_path)
    assert set(first) == {"network", "optimizer", "lr_scheduler", "ema", "trainer", "rng", "rng_per_rank"}
    assert first["trainer"]["iteration"] == 2
    assert (root / "run" / "models" / "model.pt").is_file()

    # a second run with a longer schedule resumes from checkpoint_last: the step count continues from 2 to 4
    proc = _run("training", train, "--max_epochs", "2")
    assert "resumed from" in proc.stdout + proc.stderr
    second = load_checkpoint(ckpt_path)
    assert second["trainer"]["iteration"] == 4 and second["trainer"]["max_epochs"] == 2
    assert any(not torch.equal(second["network"][k], first["network"][k]) for k in first["network"])
    assert second["optimizer"]["state"][0]["step"].item() == 4  # Adam continued from its saved moments

    # monai.bundle.load builds network_def (initialize touches no data) and loads the EMA weights, weights_only

    import monai.bundle

    copy = root / "bundle_copy" / BUNDLE.name
    for folder in ("configs", "scripts"):  # the network class is the bundle's own (scripts/network.py)
        shutil.copytree(BUNDLE / folder, copy / folder, dirs_exist_ok=True)
    (copy / "models").mkdir(exist_ok=True)
    shutil.copy(root / "run" / "models" / "model.pt", copy / "models" / "model.pt")
    tiny_net = {k: TINY[k] for k in ("channels", "attention_levels", "num_res_blocks", "norm_num_groups")}
    from brainsynth.engine.bundle_code import bundle_scripts

    with bundle_scripts(copy):  # the bundle folder on sys.path, as its README says for monai.bundle.load
        net = monai.bundle.load(
            name=BUNDLE.name,
            bundle_dir=str(copy.parent),
            device="cpu",
            net_override={**tiny_net, "num_head_channels": TINY["channels"]},
        )
    ema = load_checkpoint(root / "run" / "models" / "model.pt")
    assert all(torch.equal(ema[k], v) for k, v in net.state_dict().items())
    assert any(not torch.equal(ema[k], second["network"][k]) for k in ema)  # EMA weights, not the live ones

    # sample the cohort's test masks with the trained weights; outputs sit on the masks' grids
    _run("inference", ["configs/inference.json", "configs/demo.json", str(overlay)])
    tests = split_items(discover(cohort), "test")
    assert tests
    for row in tests:
        folder = root / "run" / "outputs" / row["subject"]
        mask_img = nib.load(row["seg"])
        for suffix in ("t1n", "t1c", "t2w", "t2f"):
            out = nib.load(str(folder / f"{row['subject']}-{suffix}.nii.gz"))
            assert out.shape == mask_img.shape
            np.testing.assert_allclose(out.affine, mask_img.affine, atol=1e-6)
            data = np.asarray(out.dataobj)
            assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1 and data.std() > 0
            # marked synthetic: header and a sidecar that matches this run (weights, seed, sampler, the mask)
            record = read_provenance(folder / f"{row['subject']}-{suffix}.nii.gz")
            assert record["source"] == "sidecar" and record["bundle"] == BUNDLE.name
            assert record["weights_sha256"] == sha256_file(root / "run" / "models" / "model.pt")
            assert record["seed"] == 0 and record["sampler"] == "ddim" and record["num_inference_steps"] == 2
            assert record["settings"]["prediction_type"] == "v_prediction"  # the demo overlay's, recorded
            assert len(record["conditions"]["mask_sha256"]) == 64
            assert record["conditions"]["label_convention"] == row["label_convention"] == "brats2023"
            assert out.header["descrip"].tobytes().startswith(MARKER.encode())
        seg = np.asarray(nib.load(str(folder / f"{row['subject']}-seg.nii.gz")).dataobj)
        np.testing.assert_array_equal(seg, np.asarray(mask_img.dataobj))  # BraTS 2023 labels 1-3 = canonical 1-3
        assert (folder / f"{row['subject']}-preview.png").stat().st_size > 1000

    # the output folder is itself a dataset (downstream training reads it)
    synthetic = discover(root / "run" / "outputs")
    assert {r["subject"] for r in synthetic} == {r["subject"] for r in tests}
    assert all({"t1w", "t1ce", "t2w", "flair", "seg", "brain_mask"} <= set(r) for r in synthetic)

    # running again must not replace the earlier outputs
    proc = _run("inference", ["configs/inference.json", "configs/demo.json", str(overlay)], expect_ok=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "already have outputs (nothing was generated)" in log
    assert "condition mask problems" not in log  # the masks are fine: the heading names the real problem

    # masks larger than the model's grid (BraTS 240 x 240 x 155 against 192 x 192 x 144): here the condition masks
    # padded by 4 voxels in-plane to 32 x 32 x 16 around the 24 x 24 x 16 grid. Every voxel outside the generated
    # centre region is background (0 in the saved [0, 1] range), never Invertd's mid-grey 0.5
    from monai.transforms import ResizeWithPadOrCrop

    masks, cropped = root / "padded_masks", root / "run" / "cropped"
    masks.mkdir()
    for index in range(2):
        lm, affine = _condition_mask(cohort, index)
        save_nifti(np.pad(lm, ((4, 4), (4, 4), (0, 0))), masks / f"padded{index}.nii.gz", affine=affine, dtype=np.int16)
    _run(
        "inference",
        ["configs/inference.json", "configs/demo.json", str(overlay)],
        "--dataset_dir",
        str(masks),
        "--output_dir",
        str(cropped),
    )
    resize = ResizeWithPadOrCrop((24, 24, 16))
    inside = np.asarray(resize.inverse(resize(torch.ones(1, 32, 32, 16)))[0]) > 0  # the generated region
    assert inside.sum() == 24 * 24 * 16
    for index in range(2):
        for suffix in ("t1n", "t1c", "t2w", "t2f"):
            data = np.asarray(nib.load(str(cropped / f"padded{index}" / f"padded{index}-{suffix}.nii.gz")).dataobj)
            assert data.shape == (32, 32, 16)
            assert np.all(data[~inside] == 0), (suffix, np.unique(data[~inside])[:5])
            assert data[inside].std() > 0


def _condition_mask(cohort, subject_index=0):
    row = split_items(discover(cohort), "training")[subject_index]
    seg = np.asarray(nib.load(row["seg"]).dataobj)
    brain = np.asarray(nib.load(row["brain_mask"]).dataobj)
    lm = SemanticMaskConditioning(BRATS_CLASSES).label_map(seg, {"brain": brain}).numpy()
    return lm, nib.load(row["seg"]).affine


def test_bad_masks_are_rejected_before_any_work(workspace, tmp_path):
    root, cohort, _ = workspace
    inputs = _scripts()
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    lm, affine = _condition_mask(cohort)
    good = save_nifti(lm, tmp_path / "good.nii.gz", affine=affine, dtype=np.int16)
    outside = save_nifti(np.where(lm == 2, 9, lm), tmp_path / "outside.nii.gz", affine=affine, dtype=np.int16)
    flat = save_nifti(lm[:, :, lm.shape[2] // 2], tmp_path / "flat.nii.gz", affine=affine, dtype=np.int16)
    big = np.zeros((64, 64, 48), np.int16)
    big[4:60, 4:60, 2:46] = 4  # brain filling a 64 x 64 x 48 grid cannot be cropped to the model's 24 x 24 x 16
    big[30:36, 30:36, 20:26] = 2
    too_big = save_nifti(big, tmp_path / "too_big.nii.gz", affine=affine, dtype=np.int16)
    kwargs = dict(conditioning=cond, spatial_size=(24, 24, 16), region_keys={"brain": "brain_mask"})

    assert inputs.check_inputs(inputs.mask_rows(str(good)), **kwargs)
    for path, message in (
        (outside, r"outside\.nii\.gz: label value\(s\) \[9\] are outside"),
        (flat, r"flat\.nii\.gz: a condition mask must be a 3-D label map"),
        (too_big, r"too_big\.nii\.gz: shape \(64, 64, 48\) does not match the model's grid"),
    ):
        with pytest.raises(MaskError, match=message):
            inputs.check_inputs(inputs.mask_rows(str(path)), **kwargs)
    # a folder: every bad file is listed, the good one is not
    with pytest.raises(MaskError) as info:
        inputs.check_inputs(inputs.mask_rows(str(tmp_path)), **kwargs)
    text = str(info.value)
    assert all(name in text for name in ("outside.nii.gz", "flat.nii.gz", "too_big.nii.gz"))
    assert "good.nii.gz" not in text

    # through the bundle: the run fails in `initialize`, nothing is written
    out_dir = tmp_path / "never"
    proc = _run(
        "inference",
        ["configs/inference.json", "configs/demo.json", str(root / "tiny.json")],
        "--dataset_dir",
        str(outside),
        "--output_dir",
        str(out_dir),
        expect_ok=False,
    )
    assert proc.returncode != 0 and "are outside this model's set" in proc.stdout + proc.stderr
    assert not out_dir.exists()


def test_inputs_missing_path_and_bare_segmentation(workspace, tmp_path):
    root, cohort, _ = workspace
    inputs = _scripts()
    with pytest.raises(DatasetError, match="does not exist"):
        inputs.mask_rows(str(tmp_path / "no_such_dir"))
    # a tumour segmentation without brain labels is not a condition mask: the error says what is missing
    row = split_items(discover(cohort), "training")[0]
    seg_only = save_nifti(
        np.asarray(nib.load(row["seg"]).dataobj), tmp_path / "seg_only.nii.gz", reference=row["seg"], dtype=np.int16
    )
    with pytest.raises(MaskError, match=r"seg_only\.nii\.gz: no brain voxels"):
        inputs.check_inputs(inputs.mask_rows(str(seg_only)), SemanticMaskConditioning(BRATS_CLASSES), (24, 24, 16))


def test_train_and_inference_configs_agree_on_the_model():
    """Weights trained with train.json must load into inference.json's network: the shared keys are identical."""
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    infer = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    shared = [
        "imports",
        "bundle_root",
        "model_path",
        "device",
        "modalities",
        "classes",
        "condition_range",
        "region_keys",
        "spatial_size",
        "channels",
        "attention_levels",
        "num_res_blocks",
        "norm_num_groups",
        "num_train_timesteps",
        "prediction_type",
        "conditioning",
        "network_def",
        "network",
        "label_convention",
        "seed",
    ]
    for key in shared:
        assert train[key] == infer[key], key
    assert train["train"]["scheduler"]["schedule"] == infer["ancestral_scheduler"]["schedule"] == "cosine_float64"
    # every scheduler on both sides follows the one prediction_type key
    schedulers = [train["train"]["scheduler"], train["train"]["preview_sampler"]["scheduler"]]
    schedulers += [infer[k] for k in ("ancestral_scheduler", "fast_scheduler", "solver_scheduler")]
    assert all(s["prediction_type"] == "@prediction_type" for s in schedulers)


@pytest.mark.slow
def test_multi_gpu_overlay_on_cpu_with_gloo(workspace, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 alone checkpoints, and a second run resumes."""
    root, _, overlay = workspace
    configs = str(["configs/train.json", "configs/multi_gpu_train.json", "configs/demo.json", str(overlay)])
    run_root = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for epochs in ("1", "2"):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            configs,
            "--bundle_root",
            str(run_root),
            "--max_epochs",
            epochs,
        ]
        proc = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(run_root / "runs" / "train" / "checkpoint_last.pt")
    assert ckpt["trainer"]["iteration"] == 4
    assert all(not k.startswith("module.") for k in ckpt["network"])  # portable: no DDP wrapper prefix


@pytest.mark.parametrize(
    "overlays,io,millions",
    [
        # the authors' counts, from their network classes (../shared/reference/FACTS.md, section 1), to the
        # precision they are known: BraTS variant 57.6 M, whole-head variant 40.2 M
        ([], (8, 4), 57.6),
        (["single_modality.json"], (3, 1), 40.2),
    ],
)
def test_paper_networks_match_the_authors_size(overlays, io, millions):
    from monai.bundle import ConfigParser

    from brainsynth.engine.bundle_code import bundle_scripts

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ["train.json", *overlays]])
    with bundle_scripts(BUNDLE):  # network_def is the bundle's own class (scripts.network)
        net = parser.get_parsed_content("network_def")
    assert (net.in_channels, net.out_channels) == io
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)
    cond = parser.get_parsed_content("conditioning")
    assert cond.num_channels + len(parser["modalities"]) == io[0]


@pytest.mark.slow
def test_evaluating_and_downstream_workflows(workspace, tmp_path):
    """The paper's table and the downstream experiment run end to end on the tiny cohort and write their tables."""
    root, _, overlay = workspace
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            {
                "bundle_root": str(tmp_path / "run"),
                "feature_input_shape": [16, 16, 16],
                "feature_epochs": 1,
                "seg_spatial_size": [24, 24, 16],
                "seg_iterations": 2,
                "augment_per_subject": 1,
                "split": "training",
            }
        )
    )
    _run("training", ["configs/train.json", "configs/demo.json", str(overlay), str(extra)])
    _run(
        "evaluating", ["configs/inference.json", "configs/evaluate.json", "configs/demo.json", str(overlay), str(extra)]
    )
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics["modalities"]) == {"t1w", "t1ce", "t2w", "flair"}
    assert all(0 <= e["mse"]["mean"] <= 1 and -1 <= e["ms_ssim"]["mean"] <= 1 for e in metrics["modalities"].values())
    assert "in-house" in metrics["feature_network"]
    _run(
        "downstream",
        ["configs/inference.json", "configs/downstream.json", "configs/demo.json", str(overlay), str(extra)],
    )
    result = json.loads((tmp_path / "run" / "eval" / "downstream" / "downstream.json").read_text())
    assert list(result["arms"]) == ["real", "synthetic", "real + synthetic"]
    arms = result["arms"]
    assert arms["real + synthetic"]["n_training_volumes"] > arms["real"]["n_training_volumes"]
    assert all(0 <= a["dice_mean"] <= 1 for a in arms.values())


def test_demo_weights_on_a_users_brats2021_folder_keep_its_naming_and_labels(tiny_trained, tmp_path):
    """Weights trained with the demo overlay (the session's tiny training), then the same overlay on a user's
    folder: every subject is generated (the overlay's test split applies to the demo cohort only; the tiny overlay
    sets no split) and the outputs are named and labelled like the input (BraTS 2021: _t1 / _t1ce / _t2 / _flair,
    enhancing = 4)."""
    root, overlay = tiny_trained("brats_mri_med_ddpm")
    assert "split" not in json.loads(overlay.read_text())  # the demo overlay's own split rule applies
    from bundle_code import brats2021_folder

    data = brats2021_folder(tmp_path, {**COHORT, "n_subjects": 3})
    out = tmp_path / "generated"
    configs = ["configs/inference.json", "configs/demo.json", str(overlay)]
    _run("inference", configs, "--bundle_root", str(root), "--dataset_dir", str(data), "--output_dir", str(out))
    subjects = sorted(p.name for p in data.iterdir())
    assert sorted(p.name for p in out.iterdir()) == subjects  # all three, whatever their hash split
    for subject in subjects:
        names = sorted(p.name for p in (out / subject).iterdir() if p.name.endswith(".nii.gz"))
        expected = [f"{subject}_{s}.nii.gz" for s in ("brain_mask", "condition", "flair", "seg", "t1", "t1ce", "t2")]
        assert names == expected
        seg = np.asarray(nib.load(out / subject / f"{subject}_seg.nii.gz").dataobj)
        real = np.asarray(nib.load(data / subject / f"{subject}_seg.nii.gz").dataobj)
        assert 4 in np.unique(real) and 3 not in np.unique(real)  # the input really is BraTS 2021 labelled
        np.testing.assert_array_equal(seg, real)  # written back in the input's numbering


def test_default_ancestral_sampler_end_to_end_is_reproducible(tiny_trained, tmp_path):
    """The authors' 250-step ancestral sampler (the bundle default) through the runner, twice with one seed:
    identical volumes; every voxel outside the condition's brain and lesion is black, every voxel inside is
    generated (finite, in [0, 1], not flat)."""
    from tiny_bundles import run

    root, overlay = tiny_trained("brats_mri_med_ddpm")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(
            "brats_mri_med_ddpm",
            "inference",
            ["train.json", "inference.json"],
            overlay,
            root,
            "--sampler",
            "ddpm",
            "--output_dir",
            out,
            "--split",
            "test",
        )
    volumes = sorted(outs[0].rglob("*-t1c.nii.gz"))
    assert volumes
    for path in volumes:
        twin = outs[1] / path.relative_to(outs[0])
        a, b = nib.load(path).get_fdata(), nib.load(twin).get_fdata()
        assert np.array_equal(a, b), f"{path.name}: two runs with one seed differ"
        record = read_provenance(path)
        assert record["sampler"] == "ddpm" and record["num_inference_steps"] is None
        condition = nib.load(path.parent / path.name.replace("-t1c", "-condition")).get_fdata()
        inside = condition > 0
        assert inside.any() and (~inside).any()
        assert np.all(a[~inside] == 0.0), "background outside the brain is not black"
        assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
        assert a[inside].std() > 0.01

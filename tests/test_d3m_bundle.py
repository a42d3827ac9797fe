"""The D3M bundle end to end through MONAI's runner, and its input checks.

One tiny simulated cohort (4 glioblastoma subjects, 6 mm, 32 x 32 x 24) is shared by the module. The runner tests
train two iterations, resume to a third, and synthesise the held-out subject's whole volume; the input tests show
that a missing modality or mismatched shapes stop the bundle with the file named, before any work.
"""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import preforked_runner
import pytest
import torch
from tiny_bundles import TINY as TINY_BUNDLES  # noqa: E402
from tiny_bundles import copy_trained

from brainsynth.data.provenance import read_provenance, sha256_file

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_d3m_cemri"

TINY = {k: v for k, v in TINY_BUNDLES["brats_mri_d3m_cemri"]["overlay"].items() if k != "progress"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("d3m")
    overlay = root / "tiny.json"
    overlay.write_text(json.dumps({**TINY, "cache_dir": str(root / "cache")}))
    return root, overlay


def run_bundle(run_id, configs, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = preforked_runner.bundle_command(run_id, configs, "--logging_file", "configs/logging.conf", *args)
    proc = preforked_runner.run(cmd, BUNDLE, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_resume_and_whole_volume_inference_through_the_runner(tiny_trained, tmp_path):
    # the session's tiny training through the runner (tests/tiny_bundles.py: 2 epochs of 1 iteration), copied so
    # that this test's resume leaves the shared weights alone
    root, overlay = tiny_trained("brats_mri_d3m_cemri")
    out = copy_trained(root, tmp_path / "bundle")
    configs = ["configs/train.json", "configs/demo.json", overlay]
    ckpt = torch.load(out / "runs" / "d3m" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 2 and set(ckpt) == {
        "network",
        "optimizer",
        "ema",
        "trainer",
        "slice_sampling",
        "rng",
        "rng_per_rank",
    }
    assert (out / "models" / "model.pt").is_file()

    log = run_bundle("training", configs, "--bundle_root", out, "--max_epochs", 3)
    assert "at iteration 2 (epoch 2)" in log  # resumed, not restarted
    ckpt = torch.load(out / "runs" / "d3m" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 3

    run_bundle("inference", ["configs/inference.json", "configs/demo.json", overlay], "--bundle_root", out)
    datalist = next((root / "cache").glob("demo-*/datalist.json"))
    test_subject = json.loads(datalist.read_text())["test"][0]
    t1_path = datalist.parent / test_subject["t1w"]
    t1 = nib.load(t1_path)
    subject = test_subject["subject"]
    # named in the input's naming (the cohort is BraTS 2023): a folder per subject that reads as a dataset
    folder = out / "outputs" / "d3m" / subject
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == [
        f"{subject}-enhancing_predicted.nii.gz",
        f"{subject}-t1c.nii.gz",
    ]
    synthetic = nib.load(folder / f"{subject}-t1c.nii.gz")
    mask = nib.load(folder / f"{subject}-enhancing_predicted.nii.gz")
    for img in (synthetic, mask):
        assert img.shape == t1.shape
        np.testing.assert_allclose(img.affine, t1.affine, atol=1e-5)
    values = synthetic.get_fdata()
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.std() > 0
    assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
    # both outputs are marked synthetic, with this run's weights, seed and the inputs' hashes (not their names)
    for name in (f"{subject}-t1c", f"{subject}-enhancing_predicted"):
        record = read_provenance(folder / f"{name}.nii.gz")
        assert record["source"] == "sidecar" and record["bundle"] == BUNDLE.name and record["seed"] == 0
        assert record["weights_sha256"] == sha256_file(out / "models" / "model.pt")
        assert record["conditions"]["t1w_sha256"] == sha256_file(t1_path)
        assert subject not in json.dumps(record["conditions"])
    # slices without brain are background, not synthesised noise
    brain_slices = (t1.get_fdata() > 0).reshape(-1, t1.shape[2]).any(0)
    assert np.all(values[..., ~brain_slices] == 0.0)


def _root_message(exc: BaseException) -> str:
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("drop_t2w", "has no t2w image"),
        ("shrink_flair", "shape (30, 32, 24) differs from"),
    ],
)
def test_bad_input_stops_before_any_work(workspace, tmp_path, damage, expected):
    from monai.bundle import ConfigWorkflow

    root, overlay = workspace
    datalist = next((root / "cache").glob("demo-*/datalist.json"), None)
    if datalist is None:  # run alone: build the tiny cohort
        from brainsynth.data import resolve_dataset_dir

        datalist = resolve_dataset_dir("demo", root / "cache", **TINY["demo_cohort"]) / "datalist.json"
    data = tmp_path / "data"
    shutil.copytree(datalist.parent, data, ignore=shutil.ignore_patterns("datalist.json", "*.json"))
    victim = sorted(p for p in data.iterdir() if p.is_dir())[0]
    if damage == "drop_t2w":
        next(victim.glob("*-t2w.nii.gz")).unlink()
    else:
        flair = next(victim.glob("*-t2f.nii.gz"))
        img = nib.load(flair)
        nib.save(nib.Nifti1Image(np.ones((30, 32, 24), np.float32), img.affine), flair)
    out = tmp_path / "bundle"
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "demo.json"), str(overlay)],
        workflow_type="train",
        run_id="training",
        bundle_root=str(out),
        dataset_dir=str(data),
        logging_file=None,
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
    )
    workflow.initialize()  # must stay cheap: monai.bundle.load and MONAI Label initialize without any data
    with pytest.raises(Exception) as info:
        workflow.run()
    message = _root_message(info.value)
    assert expected in message and victim.name in message
    assert not out.exists()  # nothing cached, trained or written


def test_demo_weights_on_a_users_brats2021_folder_keep_its_naming(tiny_trained, tmp_path):
    """Weights trained with the demo overlay (the session's tiny training), then the same overlay on a user's
    BraTS 2021-named folder without a datalist: every subject is synthesised (the overlay's test split applies to
    the demo cohort only) and the synthetic T1ce is named like the input's contrasts (``<id>_t1ce.nii.gz``)."""
    from bundle_code import brats2021_folder

    root, overlay = tiny_trained("brats_mri_d3m_cemri")
    data = brats2021_folder(tmp_path, {**TINY["demo_cohort"], "n_subjects": 3})
    out = tmp_path / "generated"
    configs = ["configs/inference.json", "configs/demo.json", overlay]
    run_bundle("inference", configs, "--bundle_root", root, "--dataset_dir", data, "--output_dir", out)
    subjects = sorted(p.name for p in data.iterdir())
    assert sorted(p.name for p in out.iterdir()) == subjects
    for subject in subjects:
        names = sorted(p.name for p in (out / subject).glob("*.nii.gz"))
        assert names == [f"{subject}_enhancing_predicted.nii.gz", f"{subject}_t1ce.nii.gz"]
        t1 = nib.load(data / subject / f"{subject}_t1.nii.gz")
        synthetic = nib.load(out / subject / f"{subject}_t1ce.nii.gz")
        assert synthetic.shape == t1.shape and np.allclose(synthetic.affine, t1.affine, atol=1e-5)

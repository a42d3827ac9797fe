"""Opt-in (``python -m pytest -m monailabel``): each bundle served by MONAI Label's stock ``monaibundle`` app
(0.8.5, in its own virtual environment because it pins numpy 1.26), called through the REST infer endpoint.

Per bundle: train one iteration with the demo overlay (repository side), package the weights into the bundle
archive, download it with ``monai.bundle download``, serve it with a real MONAI Label server on 127.0.0.1
(ci/monailabel/serve_and_infer.py), and compare the returned volume with the repository's own inference of the
same input and seed. MONAI Label reads configs/inference.json only, so the unpacked bundle gets the demo overlay
merged into it (what a user does for weights trained at non-default sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))
sys.path.insert(0, str(REPO / "ci" / "monailabel"))

import package_bundles as pb  # noqa: E402
import serve_and_infer as sai  # noqa: E402
import verify_bundles as vb  # noqa: E402

pytestmark = pytest.mark.monailabel


@pytest.fixture(scope="module")
def monailabel_python():
    proc = subprocess.run(
        ["bash", str(REPO / "ci" / "monailabel" / "setup_venv.sh")], capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _run(cmd, cwd):
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _stack(bundle_dir: Path, name: str) -> list[str]:
    configs = vb.classify_configs(bundle_dir)
    return (
        vb.config_stack(bundle_dir, name, configs.train if name in configs.train else configs.runnable)
        + configs.demo[:1]
    )


# settings both sides use, so the comparison is exact: a deterministic sampler (an ancestral sampler draws its
# per-step noise from the global RNG, which a long-running server does not reseed per request)
SHARED_SETTINGS = {"brats_mri_med_ddpm": {"sampler": "ddim", "num_inference_steps": 10}}


def _infer(scratch: Path, bundle_dir: Path, *overrides: str) -> None:
    """The repository-side inference (demo overlay, its cohort cut small as in verification, the shared settings),
    with extra ``--key value`` overrides."""
    stack = _stack(bundle_dir, "inference.json")
    shared = [a for k, v in SHARED_SETTINGS.get(bundle_dir.name, {}).items() for a in (f"--{k}", str(v))]
    _run(
        [
            sys.executable,
            "-m",
            *vb.bundle_run_args(scratch, stack, "infer"),
            "--bundle_root",
            str(scratch),
            *vb.data_arguments(vb._merged(bundle_dir, stack), None),
            *shared,
            *overrides,
        ],
        cwd=scratch,
    )


# --- what each bundle takes from MONAI Label, and the repository run it must agree with -------------------------
def med_ddpm_case(scratch: Path, bundle_dir: Path, tmp: Path) -> tuple[Path, dict, np.ndarray]:
    """A condition label map in, one modality out (chosen per request)."""
    _infer(scratch, bundle_dir, "--output_dir", str(tmp / "first"))
    mask = sorted((tmp / "first").rglob("*-condition.nii.gz"))[0]
    # the same mask alone, so it is the sampler's first call (same initial noise as MONAI Label's single request)
    _infer(scratch, bundle_dir, "--dataset_dir", str(mask), "--output_dir", str(tmp / "reference"))
    (reference,) = sorted((tmp / "reference").rglob("*-t1c.nii.gz"))
    return mask, {"output_modality": "t1ce"}, nib.load(reference).get_fdata()


def d3m_case(scratch: Path, bundle_dir: Path, tmp: Path) -> tuple[Path, dict, np.ndarray]:
    """One 4-D volume (T1w, T2w, FLAIR) in, the synthetic T1ce out."""
    t1n = sorted(scratch.rglob("*-t1n.nii.gz"))[0]  # a subject of the simulated cohort the training run built
    files = {m: str(t1n).replace("-t1n.", f"-{s}.") for m, s in (("t1w", "t1n"), ("t2w", "t2w"), ("flair", "t2f"))}
    images = [nib.load(f) for f in files.values()]
    stacked = tmp / "t1w_t2w_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([i.get_fdata(dtype=np.float32) for i in images], -1), images[0].affine), stacked)
    _infer(
        scratch,
        bundle_dir,
        "--input_files",
        repr(files),
        "--split",
        "all",  # this subject, whatever its split
        "--output_dir",
        str(tmp / "reference"),
    )  # its split
    (reference,) = sorted((tmp / "reference").rglob("*-t1c.nii.gz"))
    return stacked, {"output": "t1ce"}, nib.load(reference).get_fdata()


def ldm_case(scratch: Path, bundle_dir: Path, tmp: Path) -> tuple[Path, dict, np.ndarray]:
    """Conditions in (request params), a volume out; the sent volume only fixes the grid, so it is a volume of the
    generated size and spacing, and the result must be the repository's first sample for that combination."""
    _infer(
        scratch,
        bundle_dir,
        "--pathology",
        "sclerosis",
        "--modality",
        "flair",
        "--num_samples",
        "1",
        "--output_dir",
        str(tmp / "reference"),
    )
    (reference,) = sorted((tmp / "reference").rglob("*.nii.gz"))
    ref = nib.load(reference)
    grid = tmp / "grid.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.float32), ref.affine), grid)
    return grid, {"pathology": "sclerosis", "modality": "flair"}, ref.get_fdata()


CASES = {"brats_mri_med_ddpm": med_ddpm_case, "brats_mri_d3m_cemri": d3m_case, "brain_mri_conditional_ldm": ldm_case}
BUNDLES = pb.discover_bundles()


def test_every_bundle_has_a_monailabel_case():
    assert sorted(b.name for b in BUNDLES) == sorted(CASES), "add the bundle's MONAI Label case to this file"


@pytest.mark.parametrize(
    "bundle_dir", [b for b in BUNDLES if b.name in CASES], ids=[b.name for b in BUNDLES if b.name in CASES]
)
def test_monailabel_serves_bundle(bundle_dir, monailabel_python, tmp_path):
    from monai.bundle import ConfigParser, download

    configs = vb.classify_configs(bundle_dir)
    scratch = vb.scratch_copy(bundle_dir, tmp_path / "scratch")
    for stack in sorted((_stack(bundle_dir, t) for t in configs.train), key=len):
        r = vb.run_workflow(
            scratch, stack, "train", max_iterations=1, extra_args=vb.data_arguments(vb._merged(bundle_dir, stack), None)
        )
        assert r["returncode"] == 0, r["output"][-3000:]
    zip_path = pb.build_archive(bundle_dir, tmp_path / "dist", models_dir=scratch / "models")
    (tmp_path / "workflow").mkdir()
    download(
        name=bundle_dir.name, url=zip_path.resolve().as_uri(), bundle_dir=str(tmp_path / "workflow"), progress=False
    )
    served = tmp_path / "workflow" / bundle_dir.name
    parser = ConfigParser()
    parser.read_config(
        [str(served / "configs" / "inference.json")] + [str(served / "configs" / d) for d in configs.demo[:1]]
    )
    parser.config.update(SHARED_SETTINGS.get(bundle_dir.name, {}))
    (served / "configs" / "inference.json").write_text(json.dumps(parser.config, indent=1))

    image, params, expected = CASES[bundle_dir.name](scratch, bundle_dir, tmp_path)
    result = sai.serve_and_infer(
        monailabel_python, served, image, tmp_path / "monailabel_out.nii.gz", params, work=tmp_path / "monailabel"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1))
    print(result["log_tail"])
    assert "error" not in result, result["error"] + "\n" + result["log_tail"]
    assert bundle_dir.name in result["models"]

    out = nib.load(result["out"])
    got = out.get_fdata()
    ref_img = nib.load(image)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert got.shape[:3] == ref_img.shape[:3]
    np.testing.assert_allclose(out.affine, ref_img.affine, atol=1e-4)  # returned in the input's geometry
    assert np.isfinite(got).all() and got.std() > 0
    # the same volume the repository's inference writes for this input and seed (another torch build: tolerance)
    np.testing.assert_allclose(got, expected, atol=1e-3)

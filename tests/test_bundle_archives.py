"""Bundle archives (ci/package_bundles.py): MONAI's layout, self-contained, downloadable with MONAI's own
``monai.bundle download``, the same output as the repository, and weight files refused on a hash mismatch.

The mechanics are tested on a toy bundle (seconds); every real bundle's archive is checked for layout, and its
full round trip (train one iteration, package the weights, download, infer in a clean process, compare with the
repository run) is a slow test (``-m slow``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

import package_bundles as pb  # noqa: E402
import verify_bundles as vb  # noqa: E402

from brainsynth.engine.bundle_archive import WeightFileError, read_large_files, verify_large_files  # noqa: E402

TOY = "toy_brain_bundle"
TOY_INFERENCE = {
    "imports": ["$import brainsynth", "$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "seed": 7,
    "output_path": "$@bundle_root + '/eval/output.nii.gz'",
    "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding": 1},
    "network": "$@network_def.to(@device).eval()",
    "weights": "$brainsynth.engine.io.load_checkpoint(@bundle_root + '/models/model.pt')",
    "initialize": [
        "$brainsynth.engine.training.reject_unknown_overrides()",
        "$brainsynth.engine.bundle_archive.verify_large_files(@bundle_root)",
        "$brainsynth.engine.training.seed_everything(@seed)",
    ],
    "inference": [
        "$@network.load_state_dict(@weights)",
        "$brainsynth.engine.io.save_nifti(@network(torch.rand(1, 1, 8, 8, 8))[0].movedim(0, -1), @output_path)",
    ],
}


def _meta(version="0.1.0"):
    io = {
        "type": "image",
        "format": "magnitude",
        "num_channels": 1,
        "spatial_shape": [8, 8, 8],
        "dtype": "float32",
        "value_range": [0, 1],
    }
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
        "meta_schema_20240725.json",
        "version": version,
        "changelog": {version: "toy"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "numpy_version": "2.0",
        "required_packages_version": {"nibabel": "5.3.2"},
        "task": "toy",
        "description": "toy",
        "authors": "tests",
        "copyright": "tests",
        "network_data_format": {"inputs": {"image": io}, "outputs": {"pred": {**io, "num_channels": 2}}},
    }


@pytest.fixture
def toy(tmp_path):
    """A toy bundle that imports brainsynth, checks its weights and writes one seeded output; plus its weights."""
    bundle = tmp_path / "src" / TOY
    (bundle / "configs").mkdir(parents=True)
    (bundle / "docs").mkdir()
    (bundle / "LICENSE").write_text("Apache-2.0\n")
    (bundle / "docs" / "README.md").write_text("toy\n")
    (bundle / "configs" / "metadata.json").write_text(json.dumps(_meta()))
    (bundle / "configs" / "inference.json").write_text(json.dumps(TOY_INFERENCE))
    (bundle / "configs" / "__pycache__").mkdir()
    (bundle / "configs" / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    models = tmp_path / "trained" / "models"
    models.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torch.nn.Conv3d(1, 2, 3, padding=1).state_dict(), models / "model.pt")
    torch.save({"optimizer": {}}, models / "checkpoint_last.pt")  # a training checkpoint: never released
    return bundle, models


def _run(cmd, cwd, env=None, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _download(zip_path: Path, name: str, dest: Path) -> Path:
    """MONAI's own download (what ``python -m monai.bundle download --name N --url file://... --bundle_dir D``
    calls) into a fresh folder; returns the unpacked bundle."""
    from monai.bundle import download

    download(name=name, url=zip_path.resolve().as_uri(), bundle_dir=str(dest), progress=False)
    return dest / name


def test_toy_archive_layout_hashes_and_reproducibility(toy, tmp_path):
    bundle, models = toy
    out = tmp_path / "dist"
    zip_path = pb.build_archive(bundle, out, models_dir=models)
    assert zip_path.name == f"{TOY}_v0.1.0.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names} == {TOY}  # one top-level folder named after the bundle
        for required in (
            "LICENSE",
            "configs/metadata.json",
            "configs/inference.json",
            "docs/README.md",
            "large_files.yml",
            "models/model.pt",
            "brainsynth/__init__.py",
            "brainsynth/engine/io.py",
            "brainsynth/engine/bundle_archive.py",
        ):
            assert f"{TOY}/{required}" in names, required
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "checkpoint_last" in n]
        # the vendored library is byte-identical to the repository's single copy
        assert zf.read(f"{TOY}/brainsynth/engine/io.py") == (REPO / "common/brainsynth/engine/io.py").read_bytes()
        model_bytes = zf.read(f"{TOY}/models/model.pt")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(unpacked)
    (entry,) = read_large_files(unpacked / TOY)
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "sha256"
    assert entry["hash_val"] == hashlib.sha256(model_bytes).hexdigest()
    assert entry["url"] == (out / f"{TOY}_v0.1.0" / "models" / "model.pt").resolve().as_uri()
    # the same inputs give the same bytes; an existing archive is never silently replaced
    first = zip_path.read_bytes()
    with pytest.raises(pb.PackagingError, match="already exists"):
        pb.build_archive(bundle, out, models_dir=models)
    pb.build_archive(bundle, out, models_dir=models, overwrite=True)
    assert zip_path.read_bytes() == first


def test_toy_archive_downloads_and_runs_without_the_repository(toy, tmp_path):
    bundle, models = toy
    zip_path = pb.build_archive(bundle, tmp_path / "dist", models_dir=models)

    # reference: the bundle run from the repository side (editable brainsynth), weights in its models/
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes((models / "model.pt").read_bytes())
    _run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json"],
        cwd=bundle,
    )
    expected = nib.load(bundle / "eval" / "output.nii.gz").get_fdata()

    workflow_dir = tmp_path / "workflow"
    workflow_dir.mkdir()
    unpacked = _download(zip_path, TOY, workflow_dir)
    cmd, env = pb.without_repository_command("-c", "import brainsynth; print(brainsynth.__file__)")
    where = _run(cmd, cwd=unpacked, env=env).stdout.strip()
    assert Path(where).resolve() == (unpacked / "brainsynth" / "__init__.py").resolve()
    cmd, env = pb.without_repository_command("-c", "import brainsynth")
    assert _run(cmd, cwd=tmp_path, env=env, check=False).returncode != 0  # really no repository on the path

    cmd, env = pb.without_repository_command(
        "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json"
    )
    _run(cmd, cwd=unpacked, env=env)
    got = nib.load(unpacked / "eval" / "output.nii.gz").get_fdata()
    assert got.shape == (8, 8, 8, 2)
    np.testing.assert_array_equal(got, expected)

    # what monai.bundle.load gives: network_def with models/model.pt loaded; the configs import brainsynth, so the
    # bundle folder must be on sys.path (load does not add it), as each bundle's README says
    load = (
        f"import monai.bundle as mb\nn = mb.load(name={TOY!r}, bundle_dir={str(workflow_dir)!r}, "
        "workflow_type='inference', device='cpu')\nprint(type(n).__name__, float(n.weight.sum()))"
    )
    cmd, env = pb.without_repository_command("-c", f"import sys; sys.path.insert(0, {str(unpacked)!r})\n" + load)
    name, total = _run(cmd, cwd=workflow_dir, env=env).stdout.split()[-2:]
    ref = torch.load(models / "model.pt", weights_only=True)
    assert name == "Conv3d" and float(total) == pytest.approx(float(ref["weight"].sum()), rel=1e-6)


def test_weight_file_with_wrong_hash_is_refused(toy, tmp_path):
    bundle, models = toy
    zip_path = pb.build_archive(bundle, tmp_path / "dist", models_dir=models)
    unpacked = _download(zip_path, TOY, tmp_path)
    assert verify_large_files(unpacked)
    weights = unpacked / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=r"model\.pt: sha256 is [0-9a-f]{64} but .*refusing"):
        verify_large_files(unpacked)
    # the bundle refuses it before loading, through MONAI's own runner in a clean process
    cmd, env = pb.without_repository_command(
        "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json"
    )
    proc = _run(cmd, cwd=unpacked, env=env, check=False)
    assert proc.returncode != 0
    assert "model.pt: sha256 is" in proc.stderr and "refusing" in proc.stderr
    assert not (unpacked / "eval" / "output.nii.gz").exists()
    # MONAI's download_large_files refuses the existing file too
    from monai.bundle import download_large_files

    with pytest.raises(Exception, match="hash check of existing file failed"):
        download_large_files(bundle_path=str(unpacked))
    # a missing file is named, with the command that fetches it
    weights.unlink()
    with pytest.raises(WeightFileError, match="missing; fetch it with `python -m monai.bundle download_large_files"):
        verify_large_files(unpacked)
    # a deleted large_files.yml does not turn the check off silently: the archive's weights are unverifiable
    weights.write_bytes(bytes(data))
    (unpacked / "large_files.yml").unlink()
    with pytest.raises(WeightFileError, match="large_files.yml: missing from this bundle archive, so model.pt cannot"):
        verify_large_files(unpacked)


def test_packaging_refuses_incomplete_bundles(toy, tmp_path):
    bundle, models = toy
    (bundle / "LICENSE").unlink()
    with pytest.raises(pb.PackagingError, match="missing LICENSE"):
        pb.build_archive(bundle, tmp_path / "dist")
    (bundle / "LICENSE").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pb.PackagingError, match="no weight files"):
        pb.build_archive(bundle, tmp_path / "dist", models_dir=tmp_path / "empty")
    # without weights the listing is empty and verification has nothing to refuse
    zip_path = pb.build_archive(bundle, tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as zf:
        assert not [n for n in zf.namelist() if "/models/" in n]
        assert "large_files: []" in zf.read(f"{TOY}/large_files.yml").decode()


# --- the real bundles -----------------------------------------------------------------------------------------
REAL = pb.discover_bundles()


@pytest.mark.parametrize("bundle_dir", REAL, ids=[p.name for p in REAL])
def test_real_bundle_archive_layout(bundle_dir, tmp_path):
    zip_path = pb.build_archive(bundle_dir, tmp_path)
    name = bundle_dir.name
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        assert {n.split("/")[0] for n in names} == {name}
        for cfg in (bundle_dir / "configs").glob("*"):
            assert zf.read(f"{name}/configs/{cfg.name}") == cfg.read_bytes()
        lib = sorted(
            p.relative_to(REPO / "common")
            for p in (REPO / "common/brainsynth").rglob("*.py")
            if "__pycache__" not in p.parts
        )
        assert all(f"{name}/{p.as_posix()}" in names for p in lib)
        assert f"{name}/large_files.yml" in names and f"{name}/LICENSE" in names


def _train_one_iteration(bundle_dir: Path, scratch: Path) -> None:
    """Every stage one iteration with the demo overlay on its cohort cut small (as verification does)."""
    configs = vb.classify_configs(bundle_dir)
    for stack in sorted((vb.config_stack(bundle_dir, t, configs.train) for t in configs.train), key=len):
        stack = stack + configs.demo[:1]
        r = vb.run_workflow(
            scratch, stack, "train", 1, extra_args=vb.data_arguments(vb._merged(bundle_dir, stack), None)
        )
        assert r["returncode"] == 0, r["output"][-3000:]


def _inference_args(bundle_dir: Path) -> list[str]:
    """``monai.bundle run <id> --config_file [inference, demo]`` on the same small demo cohort."""
    configs = vb.classify_configs(bundle_dir)
    stack = vb.config_stack(bundle_dir, "inference.json", configs.runnable) + configs.demo[:1]
    return vb.bundle_run_args(bundle_dir, stack, "infer") + vb.data_arguments(vb._merged(bundle_dir, stack), None)


def _repository_run(bundle_dir, tmp_path):
    """Train one iteration in a scratch copy, package its weights, run inference there: the reference outputs."""
    scratch = vb.scratch_copy(bundle_dir, tmp_path / "scratch")
    _train_one_iteration(bundle_dir, scratch)
    zip_path = pb.build_archive(bundle_dir, tmp_path / "dist", models_dir=scratch / "models")
    run_args = _inference_args(bundle_dir)
    before = {p for p in scratch.rglob("*") if p.is_file()}
    _run([sys.executable, "-m", *run_args], cwd=scratch)
    repo_outputs = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*.nii*") if p not in before)
    assert repo_outputs
    return scratch, zip_path, run_args, repo_outputs


def _assert_same_volumes(root, reference_root, rels):
    for rel in rels:
        # same weights, inputs and seeds; float32 reductions may run in another order in another process
        np.testing.assert_allclose(
            nib.load(root / rel).get_fdata(), nib.load(reference_root / rel).get_fdata(), atol=1e-5, err_msg=rel
        )


@pytest.mark.slow
@pytest.mark.parametrize("bundle_dir", REAL, ids=[p.name for p in REAL])
def test_real_bundle_archive_round_trip_matches_repository(bundle_dir, tmp_path):
    """Train one iteration (demo overlay), package the weights, download the zip with MONAI, run its inference in a
    process that cannot see the repository, and compare every NIfTI output with the repository-side run."""
    scratch, zip_path, run_args, repo_outputs = _repository_run(bundle_dir, tmp_path)
    (tmp_path / "workflow").mkdir()
    unpacked = _download(zip_path, bundle_dir.name, tmp_path / "workflow")
    cmd, env = pb.without_repository_command("-m", *run_args)
    _run(cmd, cwd=unpacked, env=env)
    _assert_same_volumes(unpacked, scratch, repo_outputs)


@pytest.fixture(scope="module")
def fresh_venv_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fresh_venvs")


@pytest.mark.slow
@pytest.mark.parametrize("bundle_dir", REAL, ids=[p.name for p in REAL])
def test_real_bundle_archive_in_a_fresh_environment(bundle_dir, tmp_path, fresh_venv_root):
    """The issue's 'done when': a fresh virtual environment with only torch, MONAI and the packages in
    metadata.json's required_packages_version (nothing of this repository) downloads the archive with MONAI's
    CLI, runs its inference, and writes the same volumes as the repository run (same weights, same seed)."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    venv = fresh_venv_root / bundle_dir.name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    pins = [f"{name}=={version}" for name, version in meta["required_packages_version"].items()]
    _run(
        [
            py,
            "-m",
            "pip",
            "install",
            "-q",
            f"torch=={meta['pytorch_version']}",
            f"monai=={meta['monai_version']}",
            *pins,
        ],
        cwd=tmp_path,
    )
    probe = _run([py, "-c", "import importlib.util as u; print(u.find_spec('brainsynth'))"], cwd=tmp_path)
    assert probe.stdout.strip() == "None"

    scratch, zip_path, run_args, repo_outputs = _repository_run(bundle_dir, tmp_path)

    workflow = tmp_path / "workflow"
    workflow.mkdir()
    _run(
        [
            py,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            bundle_dir.name,
            "--url",
            zip_path.resolve().as_uri(),
            "--bundle_dir",
            str(workflow),
        ],
        cwd=workflow,
    )
    unpacked = workflow / bundle_dir.name
    _run([py, "-m", *run_args], cwd=unpacked)
    _assert_same_volumes(unpacked, scratch, repo_outputs)


def _readme_archive_commands() -> list[str]:
    """The bash lines of the README block marked ``archive-commands``."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- archive-commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_archive_commands_run_as_written_on_a_demo_weights_archive(tmp_path):
    """The README's package / download / run lines, with DIR, MASKS and OUT filled in (and, to keep the suite fast,
    the demo training cut to one iteration and the generation to a 2-step DDIM instead of the 250-step ancestral
    default, which tests/test_med_ddpm_bundle.py runs end to end): a newcomer's exact path, from packaging to
    generated volumes."""
    import os

    from brainsynth.data import resolve_dataset_dir

    lines = _readme_archive_commands()
    assert len(lines) == 3 and "configs/demo.json" in lines[2] and "--demo-weights" in lines[0]
    masks = resolve_dataset_dir(
        "demo", tmp_path / "cache", n_subjects=1, spacing=7.5, seed=4, pathologies=["glioblastoma"]
    )
    script = " && ".join(lines)
    script = script.replace("python ci/", f"{sys.executable} {REPO}/ci/").replace("python -m", f"{sys.executable} -m")
    script = script.replace("--demo-weights", "--demo-weights 1").replace("DIR", str(tmp_path / "installed"))
    script = script.replace("MASKS", str(masks)).replace("OUT", str(tmp_path / "generated"))
    script += " --sampler ddim --num_inference_steps 2"  # appended to the last line: the generation
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (subject,) = [p for p in (tmp_path / "generated").iterdir()]
    names = sorted(p.name for p in subject.glob("*.nii.gz"))
    assert [n for n in names if n.endswith(("-t1n.nii.gz", "-t1c.nii.gz", "-t2w.nii.gz", "-t2f.nii.gz"))] == sorted(
        f"{subject.name}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f")
    )
    assert (tmp_path / "dist").is_dir() and (
        tmp_path / "installed" / "brats_mri_med_ddpm" / "models" / "model.pt"
    ).is_file()

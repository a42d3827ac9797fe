"""The verification command (ci/verify_bundles.py): it passes for every bundle, and it fails - naming the
problem - for a bundle with the faults it is there to catch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

import verify_bundles as vb  # noqa: E402

BUNDLES = vb.discover_bundles()
CHECKS = ("files", "metadata", "configs", "requirements", "tracking", "monailabel", "net_in_out", "overrides")


# In the default suite: CI's one verification command, every bundle's train and inference configs run through
# MONAI's runner. Inference samples with a 2-step DDIM (--sampling-steps): with each config's own sampler, Med-DDPM's
# 250-step ancestral one alone took most of the check's 2-3 minutes; that sampler runs end to end, twice, in
# tests/test_med_ddpm_bundle.py, and the fast samplers' step counts in tests/test_samplers.py.
@pytest.mark.skipif(not BUNDLES, reason="no bundle under bundles/ yet")
def test_verification_command_passes_for_every_bundle(tmp_path):
    """CI's verification: the one command, all bundles, including a one-iteration train run of every train config
    and one run of every inference config on tiny simulated-cohort data (the demo overlays)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "ci" / "verify_bundles.py"), "--work", str(tmp_path), "--sampling-steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = proc.stdout
    print(report)
    assert proc.returncode == 0, report[-6000:] + proc.stderr[-3000:]
    rows = re.findall(r"^(PASS|FAIL)  (\S+)\s+(.+?)  \[", report, flags=re.M)
    for bundle in BUNDLES:
        names = [name for status, b, name in rows if b == bundle.name and status == "PASS"]
        assert set(CHECKS) <= set(names), (bundle.name, names)
        configs = vb.classify_configs(bundle)
        assert sum(n.startswith("run train ") for n in names) == len(configs.train), names
        assert sum(n.startswith("run infer ") for n in names) == len(configs.infer), names


@pytest.fixture
def broken(tmp_path):
    """A copy of a real bundle with the faults the verification exists to catch."""
    if not BUNDLES:
        pytest.skip("no bundle under bundles/ yet")
    # the bundle whose own configs already pass, so each fault found below is the injected one
    src = next((b for b in BUNDLES if b.name == "brats_mri_med_ddpm"), BUNDLES[0])
    dest = tmp_path / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "models", "eval", "cache", "outputs"))
    cfg = dest / "configs"
    meta = json.loads((cfg / "metadata.json").read_text())
    meta["version"] = "9.9.9"  # not in the changelog
    del meta["authors"]  # required by the schema
    meta["required_packages_version"] = {}  # nibabel, einops, ... unlisted
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] += 1  # not what the network returns
    (cfg / "metadata.json").write_text(json.dumps(meta))
    inference = json.loads((cfg / "inference.json").read_text())
    inference["initialize"] = inference["initialize"][1:]  # no reject_unknown_overrides() first
    del inference["device"]  # a MONAI inference property
    inference.pop("pre_transforms", None)  # MONAI Label falls back to a pipeline without "image"
    (cfg / "inference.json").write_text(json.dumps(inference))
    for train in cfg.glob("train*.json"):  # logs to the console only
        train.write_text(train.read_text().replace("TensorBoardStatsHandler", "StatsHandler"))
    for overlay in cfg.glob("multi_gpu*.json"):
        overlay.unlink()
    (dest / "LICENSE").unlink(missing_ok=True)
    readme = dest / "docs" / "README.md"
    readme.parent.mkdir(exist_ok=True)
    readme.write_text("no word on loading\n")
    return dest


def test_verifier_names_each_fault(broken):
    configs = vb.classify_configs(broken)
    files = "\n".join(vb.check_files(broken, configs))
    assert "missing LICENSE" in files
    assert "does not say what monai.bundle.load returns" in files

    metadata = "\n".join(vb.check_metadata(broken))
    assert "'authors' is a required property" in metadata
    assert "version '9.9.9' is not in the changelog" in metadata

    config_problems = "\n".join(vb.check_configs(broken, configs))
    assert (
        "inference.json: the first 'initialize' item must be $brainsynth.engine.training.reject_unknown_overrides()"
        in config_problems
    )
    assert re.search(r"inference\.json.*MONAI infer properties missing.*'device'", config_problems)
    assert "no multi-GPU overlay" in config_problems

    assert "lacks: TensorBoard logging" in "\n".join(vb.check_tracking(broken, configs))

    assert "does not read the key 'image'" in "\n".join(vb.check_monailabel(broken))

    requirements = "\n".join(vb.check_requirements(broken))
    assert "lacks 'nibabel'" in requirements and "lacks 'einops'" in requirements

    net_problems, verified = vb.check_net_in_out(broken, configs)
    assert not verified and "output channel number" in "\n".join(net_problems)


def test_unknown_override_is_rejected_with_the_valid_keys(tmp_path):
    """The static half of the override check on a two-key config: the typo is refused, the valid keys listed."""
    from brainsynth.engine.training import check_overrides

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.json").write_text(json.dumps({"max_epochs": 1, "lr": 0.1}))
    assert vb.check_overrides_static(tmp_path, vb.BundleConfigs(tmp_path, train=["train.json"])) == []
    with pytest.raises(KeyError, match=r"--max_epoch: no such config key \(did you mean --max_epochs\?\).*lr"):
        check_overrides(str(tmp_path / "configs" / "train.json"), {"max_epoch": 3})


def test_stages_merge_on_the_configs_they_build_on(tmp_path):
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "train_autoencoder.json").write_text(json.dumps({"autoencoder_def": {}, "train": {"trainer": {}}}))
    (cfg / "train_diffusion.json").write_text(
        json.dumps({"diffusion_def": {}, "latent": "$@autoencoder_def.encode(@x)", "x": 1})
    )
    (cfg / "inference.json").write_text(json.dumps({"autoencoder_def": {}, "y": "@autoencoder_def"}))
    assert vb.config_stack(tmp_path, "train_diffusion.json", ["train_autoencoder.json", "train_diffusion.json"]) == [
        "train_autoencoder.json",
        "train_diffusion.json",
    ]
    assert vb.config_stack(tmp_path, "train_autoencoder.json", ["train_autoencoder.json", "train_diffusion.json"]) == [
        "train_autoencoder.json"
    ]
    assert vb.config_stack(tmp_path, "inference.json", ["inference.json", "train_autoencoder.json"]) == [
        "inference.json"
    ]


def test_paper_scale_shapes_are_reduced_to_a_compatible_cpu_size():
    io = {
        "inputs": {
            "image": {"type": "image", "spatial_shape": [192, 192, 144]},
            "timesteps": {"type": "tensor", "spatial_shape": [1]},
        },
        "outputs": {"pred": {"type": "image", "spatial_shape": [155, "16*n", 24]}},
    }
    reduced, note = vb.cpu_sized(io)
    assert reduced["inputs"]["image"]["spatial_shape"] == [32, 32, 16]  # 192 = 64 * 3, 144 = 16 * 9
    assert all(a % b == 0 for a, b in zip([192, 192, 144], [32, 32, 16]))
    assert reduced["outputs"]["pred"]["spatial_shape"] == [155, "16*n", 24]  # odd, symbolic, small: kept
    assert reduced["inputs"]["timesteps"]["spatial_shape"] == [1]
    assert "[192, 192, 144] -> [32, 32, 16]" in note
    assert io["inputs"]["image"]["spatial_shape"] == [192, 192, 144]  # the caller's dict is untouched


@pytest.fixture(scope="module")
def mlflow_python():
    """The project's environment plus mlflow (the `mlflow` extra), in a venv that sees the system packages, so
    installing mlflow never changes the project's own environment."""
    venv = Path.home() / ".cache" / "brainsynth" / "mlflow-venv"
    py = venv / "bin" / "python"
    if subprocess.run([str(py), "-c", "import mlflow, monai, brainsynth"], capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "mlflow>=3.15.2"], check=True, timeout=1800)
    return str(py)


@pytest.mark.slow
@pytest.mark.parametrize("bundle_dir", BUNDLES, ids=[b.name for b in BUNDLES])
def test_tracking_mlflow_with_a_local_store(bundle_dir, mlflow_python, tmp_path):
    """`--tracking mlflow`: the first train config's one-iteration demo run records a finished run with a finite
    loss in MONAI's default local store (SQLite under <bundle_root>/eval)."""
    configs = vb.classify_configs(bundle_dir)
    scratch = vb.scratch_copy(bundle_dir, tmp_path)
    stack = vb.config_stack(bundle_dir, configs.train[0], configs.train) + configs.demo[:1]
    r = vb.run_workflow(
        scratch,
        stack,
        "train",
        max_iterations=1,
        python=mlflow_python,
        extra_args=["--tracking", "mlflow", *vb.data_arguments(vb._merged(bundle_dir, stack), None)],
    )
    assert r["returncode"] == 0, r["output"][-3000:]
    store = scratch / "eval" / "mlruns.db"
    assert store.is_file(), r["new_files"]
    query = (
        "import json, mlflow; c = mlflow.tracking.MlflowClient(tracking_uri='sqlite:///' + __import__('sys')"
        ".argv[1]); runs = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]; "
        "print(json.dumps([[r.info.status, r.data.metrics] for r in runs]))"
    )
    runs = json.loads(
        subprocess.run([mlflow_python, "-c", query, str(store)], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert [status for status, _ in runs] == ["FINISHED"]
    losses = {k: v for k, v in runs[0][1].items() if "loss" in k}
    assert losses and all(v == v and abs(v) != float("inf") for v in losses.values()), runs


def test_static_verification_from_a_clone_with_nothing_beside_it(tmp_path):
    """Everything the verifier reads (MONAI's metadata schema included) is in the repository: a copy of the tracked
    files alone, in a folder with nothing beside it, passes the static checks."""
    clone = tmp_path / "alone" / "repo"
    clone.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(clone)], input=archive, check=True)
    proc = subprocess.run(
        [sys.executable, str(clone / "ci" / "verify_bundles.py"), "--static", "--work", str(tmp_path / "work")],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "metadata" in proc.stdout and "FAIL" not in proc.stdout

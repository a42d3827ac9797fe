"""MONAI's own bundle API on every bundle: create_workflow + initialize + check_properties on each shipped config
(with the demo overlay), and monai.bundle.load from an unrelated working directory.

These call MONAI itself, not a re-implementation of its checks: a config that MONAI's workflow tooling rejects
fails here. ``multi_gpu_*`` configs need torch.distributed and are run by tests/test_multi_gpu.py instead.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import preforked_runner
import pytest
import torch
from monai.bundle import ConfigParser, create_workflow

from brainsynth.engine.bundle_code import bundle_scripts
from brainsynth.engine.io import save_checkpoint

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
MED, D3M, LDM = "brats_mri_med_ddpm", "brats_mri_d3m_cemri", "brain_mri_conditional_ldm"

#: (bundle, workflow type, configs before the demo overlay): every train / inference / evaluation entry point
WORKFLOWS = [
    (MED, "train", ["train.json"]),
    (MED, "train", ["train.json", "single_modality.json"]),
    (MED, "infer", ["inference.json"]),
    (MED, "infer", ["inference.json", "evaluate.json"]),
    (MED, "infer", ["inference.json", "downstream.json"]),
    (MED, "infer", ["inference.json", "augment_masks.json"]),
    (D3M, "train", ["train.json"]),
    (D3M, "train", ["train.json", "no_mssdm.json"]),
    (D3M, "train", ["train.json", "no_dsimd.json"]),
    (D3M, "train", ["train.json", "palette.json"]),
    (D3M, "infer", ["inference.json"]),
    (D3M, "infer", ["inference.json", "evaluate.json"]),
    (LDM, "train", ["train_autoencoder.json"]),
    # stage 2 is an overlay on stage 1's config (it reuses its data and autoencoder definitions), as documented
    (LDM, "train", ["train_autoencoder.json", "train_diffusion.json"]),
    (LDM, "infer", ["inference.json"]),
    (LDM, "infer", ["train_autoencoder.json", "inference_autoencoder.json"]),  # documented: merged on stage 1
    (LDM, "infer", ["inference.json", "evaluate.json"]),
]


@pytest.mark.parametrize(
    "bundle,workflow_type,configs", WORKFLOWS, ids=lambda v: "+".join(v) if isinstance(v, list) else v
)
def test_monai_create_workflow_initialize_and_check_properties(
    bundle, workflow_type, configs, demo_cache_dir, tmp_path
):
    folder = BUNDLES / bundle
    with bundle_scripts(folder):
        workflow = create_workflow(
            config_file=[str(folder / "configs" / c) for c in [*configs, "demo.json"]],
            workflow_type=workflow_type,
            meta_file=str(folder / "configs" / "metadata.json"),
            logging_file=str(folder / "configs" / "logging.conf"),
            bundle_root=str(tmp_path / "run"),
            cache_dir=str(demo_cache_dir / bundle),
        )
        workflow.initialize()
        missing = workflow.check_properties()
    assert not missing, f"MONAI reports missing properties: {missing}"


def _demo_network_settings(folder: Path) -> dict:
    """The demo overlay's network sizes (the keys network_def reads), as a MONAI args file carries them."""
    demo = json.loads((folder / "configs" / "demo.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    used = json.dumps(parser.get("network_def"))
    return {k: v for k, v in demo.items() if f"@{k}" in used}


@pytest.mark.parametrize("bundle", [MED, D3M, LDM])
def test_monai_bundle_load_from_another_working_directory(bundle, tmp_path, monkeypatch):
    """A user's own script elsewhere: put the bundle folder on sys.path (for its scripts/) and call
    monai.bundle.load; the network comes back with the bundle's weights, whatever the working directory."""
    import monai.bundle

    copy = tmp_path / "bundles" / bundle
    shutil.copytree(BUNDLES / bundle, copy, ignore=shutil.ignore_patterns("cache", "models", "eval", "runs"))
    settings = _demo_network_settings(copy)
    (tmp_path / "args.json").write_text(json.dumps(settings))
    with bundle_scripts(copy):
        parser = ConfigParser()
        parser.read_config(str(copy / "configs" / "inference.json"))
        parser.update(settings)
        torch.manual_seed(3)
        reference = parser.get_parsed_content("network_def")
    save_checkpoint(reference.state_dict(), copy / "models" / "model.pt", record=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with bundle_scripts(copy):  # sys.path insert of the bundle folder, undone afterwards
        net = monai.bundle.load(
            bundle,
            bundle_dir=str(tmp_path / "bundles"),
            workflow_type="inference",
            args_file=str(tmp_path / "args.json"),
        )
    loaded, expected = net.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, msg=f"{bundle}: {key} differs from the saved weights")
    assert not (elsewhere / "models").exists() and not list(elsewhere.iterdir())  # nothing written where it ran
    assert str(copy) not in sys.path


def test_default_bundle_root_is_the_bundle_folder_of_the_configs():
    from brainsynth.engine.bundle_code import default_bundle_root

    runner = "/env/lib/python3.11/site-packages/monai/bundle/__main__.py"
    configs = "['bundles/brats_mri_med_ddpm/configs/train.json','/tmp/overlay.json']"
    assert default_bundle_root([runner, "run", "training", "--config_file", configs]) == "bundles/brats_mri_med_ddpm"
    assert default_bundle_root([runner, "run", "training", "--config_file", "['configs/train.json']"]) == "."
    assert default_bundle_root([runner, "run", "training", "--config_file", "/tmp/elsewhere/train.json"]) == "."
    assert default_bundle_root(["pytest", "--config_file", configs]) == "."  # not the MONAI runner: MONAI's "."


def test_a_run_started_from_another_folder_writes_into_the_bundle_only(tmp_path):
    """From a repository-root-like folder with full config paths: the bundle's scripts import and every output
    lands in the bundle folder, nothing in the folder the command ran from."""
    import os

    copy = tmp_path / "bundles" / D3M
    shutil.copytree(BUNDLES / D3M, copy, ignore=shutil.ignore_patterns("cache", "models", "eval", "runs"))
    cohort = {"n_subjects": 4, "seed": 0, "spacing": 6, "shape": [32, 32, 24], "pathologies": ["glioblastoma"]}
    tiny = {"demo_cohort": cohort, "spatial_size": [32, 32], "channels": [8, 16], "attention_levels": [False, False],
            "num_res_blocks": 1, "num_head_channels": [8, 16], "norm_num_groups": 4,
            "deformer_features": [4, 4, 8, 8, 8, 4], "batch_size": 2, "slices_per_volume": 2, "epoch_length": 1,
            "max_epochs": 1, "ema_start_step": 0}  # fmt: skip
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    configs = [str(copy.relative_to(tmp_path) / "configs" / c) for c in ("train.json", "demo.json")] + ["tiny.json"]
    proc = preforked_runner.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs)],
        tmp_path,
        {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundles", "tiny.json"]
    assert (copy / "models" / "model.pt").is_file() and (copy / "runs" / "d3m" / "checkpoint_last.pt").is_file()

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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cohorts")  # one simulated cohort per bundle for the whole module


@pytest.mark.parametrize(
    "bundle,workflow_type,configs", WORKFLOWS, ids=lambda v: "+".join(v) if isinstance(v, list) else v
)
def test_monai_create_workflow_initialize_and_check_properties(bundle, workflow_type, configs, cache_dir, tmp_path):
    folder = BUNDLES / bundle
    with bundle_scripts(folder):
        workflow = create_workflow(
            config_file=[str(folder / "configs" / c) for c in [*configs, "demo.json"]],
            workflow_type=workflow_type,
            meta_file=str(folder / "configs" / "metadata.json"),
            logging_file=str(folder / "configs" / "logging.conf"),
            bundle_root=str(tmp_path / "run"),
            cache_dir=str(cache_dir / bundle),
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

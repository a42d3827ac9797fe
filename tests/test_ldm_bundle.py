"""The conditional LDM bundle end to end through `python -m monai.bundle run`, on a tiny simulated cohort."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import preforked_runner
import torch
from tiny_bundles import TINY as TINY_BUNDLES  # noqa: E402

from brainsynth.data.provenance import read_provenance, sha256_file
from brainsynth.engine.bundle_code import bundle_scripts

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_conditional_ldm"
CONFIGS = BUNDLE / "configs"

#: keys that define what the trained weights mean: training and inference configs must agree on them
SHARED_KEYS = [
    "pathologies",
    "modalities",
    "pixdim",
    "spatial_size",
    "latent_channels",
    "ae_channels",
    "ae_num_res_blocks",
    "ae_norm_num_groups",
    "ae_nonlocal_attention",
    "condition_embedding_dim",
    "unet_channels",
    "unet_attention_levels",
    "unet_num_res_blocks",
    "unet_num_head_channels",
    "unet_norm_num_groups",
    "transformer_num_layers",
    "concat_conditions",
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "autoencoder_def",
    "unet_def",
    "network_def",
]

TINY = {k: v for k, v in TINY_BUNDLES["brain_mri_conditional_ldm"]["overlay"].items() if k != "progress"}


def _merged(files: list[str]) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser


def test_training_and_inference_configs_agree_on_everything_the_weights_depend_on():
    train = _merged(["train_autoencoder.json", "train_diffusion.json"])
    infer = _merged(["inference.json"])
    for key in SHARED_KEYS:
        assert train[key] == infer[key], f"{key} differs between training and inference configs"
    # the demo overlay changes them the same way on both sides
    train_demo = _merged(["train_autoencoder.json", "train_diffusion.json", "demo.json"])
    infer_demo = _merged(["inference.json", "demo.json"])
    for key in SHARED_KEYS:
        assert train_demo[key] == infer_demo[key], f"{key} differs under demo.json"
    # every stage's preprocessing is the same image space as the evaluation's real scans
    evaluate = _merged(["inference.json", "evaluate.json"])
    steps = [
        t
        for t in train["preprocessing"]["transforms"]
        if "Conditions" not in t["_target_"] and t["_target_"] != "SelectItemsd"
    ]
    assert [t["_target_"] for t in steps] == [t["_target_"] for t in evaluate["real_preprocessing"]["transforms"]]


SAMPLING = ["inference.json"]


def _run(
    run_id: str, configs: list[str], root: Path, tiny: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m monai.bundle run RUN_ID` from the bundle folder with CONFIGS + demo.json + the tiny overlay."""
    config = [f"configs/{f}" for f in configs] + ["configs/demo.json", str(tiny)]
    cmd = preforked_runner.bundle_command(
        run_id, config, "--bundle_root", str(root), "--cache_dir", str(root / "cache"), *args
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = preforked_runner.run(cmd, BUNDLE, env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_both_stages_train_and_a_held_out_combination_is_sampled(tiny_trained, tmp_path):
    # both stages trained once per session through the runner with the tiny settings (tests/tiny_bundles.py:
    # stage 1, then stage 2 on it); this test reads what they wrote and samples into its own folder
    root, tiny = tiny_trained("brain_mri_conditional_ldm")
    ae = torch.load(root / "models" / "model_autoencoder.pt", weights_only=True)
    assert torch.isfinite(ae["latent_scale_factor"]) and float(ae["latent_scale_factor"]) > 0
    assert (root / "runs" / "autoencoder" / "previews" / "preview_iteration0000002.png").stat().st_size > 0

    assert (root / "models" / "model.pt").is_file()  # network_def: the file MONAI tools load
    assert (root / "runs" / "diffusion" / "checkpoint_last.pt").is_file()
    assert (root / "runs" / "diffusion" / "previews" / "preview_iteration0000002.png").stat().st_size > 0

    # demo.json holds sclerosis x t1ce out of training; the scans both stages trained on prove it
    parser = _merged(["train_autoencoder.json", "demo.json"])
    parser.update({"bundle_root": str(root), "cache_dir": str(root / "cache"), **TINY})
    held_out = [tuple(c) for c in parser["held_out_combinations"]]
    assert ("sclerosis", "t1ce") in held_out
    seen = {(r["pathology"], r["modality"]) for r in parser.get_parsed_content("training_scans")}
    assert seen and not seen & set(held_out)

    out = tmp_path / "held_out"
    _run(
        "inference",
        SAMPLING,
        root,
        tiny,
        "--pathology",
        "sclerosis",
        "--modality",
        "t1ce",
        "--num_samples",
        "2",
        "--output_dir",
        str(out),
    )
    volumes = sorted(out.glob("*.nii.gz"))
    assert [v.name for v in volumes] == ["sclerosis_t1ce_000.nii.gz", "sclerosis_t1ce_001.nii.gz"]
    arrays = [np.asarray(nib.load(v).dataobj) for v in volumes]
    assert all(a.shape == (16, 16, 16) and np.isfinite(a).all() for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])  # each volume from its own noise
    # each volume is marked synthetic with its own conditions and seed, and both weight files' hashes
    records = [read_provenance(v) for v in volumes]
    assert [r["conditions"] for r in records] == [{"pathology": "sclerosis", "modality": "t1ce"}] * 2
    assert records[0]["volume_seed"] != records[1]["volume_seed"]
    assert records[0]["weights_sha256"] == sha256_file(root / "models" / "model.pt")
    assert records[0]["autoencoder_sha256"] == sha256_file(root / "models" / "model_autoencoder.pt")
    assert (out / "montage.png").stat().st_size > 0

    # MONAI Label's monaibundle app: network_def with models/model.pt, then inferer(image, network) with the
    # request's conditions in displayable_configs and no initialize: the same volume as the workflow's sample 0
    with bundle_scripts(BUNDLE):
        served = _merged(SAMPLING + ["demo.json"])
        served.update({"bundle_root": str(root), **TINY})
        served["displayable_configs"].update({"pathology": "sclerosis", "modality": "t1ce"})
        network = served.get_parsed_content("network_def")
        network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
        with torch.no_grad():
            pred = served.get_parsed_content("inferer")(torch.zeros(1, 1, 16, 16, 16), network.eval())
    assert pred.shape == (1, 1, 16, 16, 16)
    np.testing.assert_allclose(pred[0, 0].numpy(), arrays[0], atol=1e-5)

    # a name outside the vocabulary fails before any sampling, listing the valid names
    bad = _run(
        "inference",
        SAMPLING,
        root,
        tiny,
        "--pathology",
        "sclerosis",
        "--modality",
        "dwi",
        "--output_dir",
        str(tmp_path / "bad"),
        check=False,
    )
    assert bad.returncode != 0
    assert "unknown modality 'dwi'; valid: t1w, t1ce, t2w, flair, pd" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

"""Every bundle lists its user-facing settings (key, default, meaning), and every setting has a meaning."""

import os
import sys
from pathlib import Path

import preforked_runner
import pytest

from brainsynth.engine.settings import user_settings

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
ENTRY_POINTS = {
    "brats_mri_med_ddpm": [["train.json"], ["inference.json"], ["inference.json", "evaluate.json"]],
    "brats_mri_d3m_cemri": [["train.json"], ["inference.json"], ["inference.json", "evaluate.json"]],
    "brain_mri_conditional_ldm": [
        ["train_autoencoder.json"],
        ["train_autoencoder.json", "train_diffusion.json"],
        ["inference.json"],
    ],
}
#: the one vocabulary: keys every bundle's inference takes
SHARED_INFERENCE_KEYS = {
    "bundle_root",
    "dataset_dir",
    "output_dir",
    "overwrite",
    "batch_size",
    "sampler",
    "num_inference_steps",
    "seed",
    "device",
}


@pytest.mark.parametrize("bundle,configs", [(b, c) for b, cs in ENTRY_POINTS.items() for c in cs], ids=str)
def test_every_user_facing_setting_has_a_meaning(bundle, configs):
    rows = user_settings([str(BUNDLES / bundle / "configs" / c) for c in configs])
    undocumented = [key for key, _, meaning in rows if not meaning]
    assert not undocumented, f"{bundle} {configs}: settings without a meaning (add _comment_<key>): {undocumented}"
    keys = {key for key, _, _ in rows}
    assert not {"imports", "initialize", "network_def"} & keys  # wiring is not listed


def test_the_same_keys_in_every_bundle():
    for bundle in ENTRY_POINTS:
        keys = {k for k, _, _ in user_settings(str(BUNDLES / bundle / "configs" / "inference.json"))}
        assert SHARED_INFERENCE_KEYS <= keys, f"{bundle}: missing {SHARED_INFERENCE_KEYS - keys}"
    for bundle, configs in (("brats_mri_med_ddpm", ["inference.json"]), ("brats_mri_d3m_cemri", ["inference.json"])):
        keys = {k for k, _, _ in user_settings([str(BUNDLES / bundle / "configs" / c) for c in configs])}
        assert "split" in keys and "subjects_split" not in keys


@pytest.mark.parametrize("bundle", list(ENTRY_POINTS))
def test_settings_run_through_the_monai_runner(bundle):
    configs = [f"configs/{c}" for c in ENTRY_POINTS[bundle][-1]] + ["configs/demo.json"]
    proc = preforked_runner.run(
        [sys.executable, "-m", "monai.bundle", "run", "settings", "--config_file", repr(configs)],
        BUNDLES / bundle,
        {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "--num_inference_steps" in out and "--batch_size" in out and "sampling steps" in out
    assert "--dataset_dir               demo" in out or "demo" in out.split("--dataset_dir", 1)[1].splitlines()[0]


#: where each bundle's configs turn ``split`` into the subjects a run uses
SPLIT_USERS = {
    "brats_mri_med_ddpm": (["inference.json"], "inputs"),
    "brats_mri_d3m_cemri": (["inference.json"], "items"),
    "brain_mri_conditional_ldm": (["inference.json", "evaluate.json"], "reference_subjects"),
}


@pytest.mark.parametrize("bundle", list(SPLIT_USERS))
def test_every_accepted_split_value_selects_the_right_subjects(bundle, demo_cache_dir):
    """split = 'all', each split name, or a list of them, as the command line passes them (MONAI turns
    ``--split "['validation','test']"`` into a list), on the bundle's demo cohort; the splits partition 'all'."""
    from monai.bundle import ConfigParser

    from brainsynth.engine.bundle_code import bundle_scripts

    configs, key = SPLIT_USERS[bundle]
    folder = BUNDLES / bundle
    counts = {}
    with bundle_scripts(folder):
        for value in ("all", "training", "validation", "test", ["validation", "test"]):
            parser = ConfigParser()
            parser.read_config([str(folder / "configs" / c) for c in [*configs, "demo.json"]])
            parser.update(
                {"split": value, "cache_dir": str(demo_cache_dir / bundle), "bundle_root": str(demo_cache_dir)}
            )
            counts[str(value)] = len(parser.get_parsed_content(key))
    assert counts["all"] == counts["training"] + counts["validation"] + counts["test"]
    assert counts["['validation', 'test']"] == counts["validation"] + counts["test"]
    assert min(counts.values()) > 0

"""Med-DDPM computes the authors' function, and a checkpoint saved by the authors' trainer runs through the bundle.

Reference data (tests/data/med_ddpm_authors/, README.md there): a checkpoint in the authors' format with random
weights, made with their own classes (the BraTS network shape at 32 channels, two levels), and their network's outputs
and one reverse step of their ancestral sampler for a fixed input, in their (D, W, H) layout.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from brainsynth.engine.bundle_code import bundle_scripts
from brainsynth.engine.io import load_checkpoint
from brainsynth.engine.training import expected_error

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_mri_med_ddpm"
DATA = Path(__file__).resolve().parent / "data" / "med_ddpm_authors"
CHECKPOINT = DATA / "authors_format_checkpoint.pt"
#: made_with.json's create_model(...) in this bundle's keys: 32 channels, two levels, attention at the second level
SMALL = {"channels": [32, 32], "num_res_blocks": 1, "attention_levels": [False, True]}
PAPER = {"embedding_max_period": 1000, "upsample_mode": "trilinear", "norm_eps": 1e-5}
MONAI_DEFAULTS = {"embedding_max_period": 10000, "upsample_mode": "nearest", "norm_eps": 1e-6}


@pytest.fixture
def scripts():
    """The bundle's ``scripts`` importable for the test (as under MONAI's runner), removed afterwards."""
    with bundle_scripts(BUNDLE):
        yield importlib.import_module("scripts.authors_checkpoint")


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(DATA / "authors_outputs.npz"))


def parsed(key: str, configs=("train.json",), **overrides):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser.update(overrides)
    return parser.get_parsed_content(key)


def to_monai(array: np.ndarray) -> torch.Tensor:
    """The authors' (B, C, D, W, H) as MONAI's (B, C, H, W, D) (and back: the permutation is its own inverse)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 1, 4, 3, 2)


def converted_network(scripts, **settings):
    network = parsed("network_def", **SMALL, **settings).eval()
    unet, _ = scripts.read_authors_checkpoint(CHECKPOINT)
    network.load_state_dict(scripts.authors_to_monai(unet, network), strict=True)
    return network


def max_output_gap(network, reference) -> float:
    x = to_monai(np.concatenate([reference["noisy_image"], reference["mask"]], axis=1))
    gap = 0.0
    with torch.no_grad():
        for t in reference["timesteps"].tolist():
            out = network(x, torch.full((x.shape[0],), t)).permute(0, 1, 4, 3, 2)
            gap = max(gap, float((out - torch.from_numpy(reference[f"t{t}"])).abs().max()))
    return gap


def test_the_paper_settings_are_the_configs_defaults():
    for configs in (("train.json",), ("inference.json",), ("train.json", "single_modality.json")):
        assert {k: parsed(k, configs) for k in PAPER} == PAPER, configs


def test_converted_checkpoint_gives_the_authors_outputs(scripts, reference):
    """At t = 0, 1, 50, 249 on MONAI-layout data; the same weights with MONAI's defaults do not (0.59 off), nor with
    MONAI's up-sampling or GroupNorm epsilon alone."""
    assert reference["timesteps"].tolist() == [0, 1, 50, 249]
    assert float(np.abs(reference["t50"]).max()) > 1.0  # outputs of order 1: the 1e-5 bound is float32 rounding
    assert max_output_gap(converted_network(scripts), reference) <= 1e-5
    assert max_output_gap(converted_network(scripts, **MONAI_DEFAULTS), reference) > 0.1
    for key in ("upsample_mode", "norm_eps"):
        assert max_output_gap(converted_network(scripts, **{key: MONAI_DEFAULTS[key]}), reference) > 1e-4, key
    # The reference cannot see the timestep embedding: at 32 channels in 32 GroupNorm groups each group is one
    # channel, so the per-channel time term a residual block adds before its second GroupNorm is normalised away
    # and the authors' outputs do not depend on t (the next test checks the embedding against its formula).
    assert float(np.abs(reference["t0"] - reference["t249"]).max()) < 1e-5


@pytest.mark.parametrize("period", [1000, 10000])
def test_timestep_embedding_has_the_configured_period(scripts, period):
    """What the time MLP receives is [cos(t f_i), sin(t f_i)], f_i = period^(-i / half) (the authors' period 1000,
    their diffusion_model/modules.py:113; MONAI's 10000), for the raw step index t."""
    network = parsed("network_def", **SMALL, embedding_max_period=period, norm_num_groups=8).eval()
    seen = []
    network.time_embed[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    steps = np.array([0, 1, 50, 249])
    with torch.no_grad():
        network(torch.zeros(4, 8, 8, 8, 8), torch.from_numpy(steps))
    half = 16
    args = steps[:, None] * np.exp(-np.log(period) * np.arange(half) / half)[None]
    np.testing.assert_allclose(seen[0].numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-5)


def test_network_with_monai_defaults_is_monais_network(scripts):
    """The class's own defaults are MONAI's DiffusionModelUNet exactly (same weights, same outputs)."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    network = converted_network(scripts, **MONAI_DEFAULTS)
    kwargs = dict(spatial_dims=3, in_channels=8, out_channels=4, channels=(32, 32), attention_levels=(False, True))
    plain = DiffusionModelUNet(**kwargs, num_res_blocks=1, num_head_channels=(32, 32), norm_num_groups=32).eval()
    plain.load_state_dict(network.state_dict(), strict=True)
    x, t = torch.randn(1, 8, 8, 8, 8), torch.tensor([17])
    with torch.no_grad():
        torch.testing.assert_close(network(x, t), plain(x, t), rtol=0, atol=0)


def step_mean_gap(scheduler, model_output: torch.Tensor, x: torch.Tensor, t: int, reference) -> tuple[float, float]:
    """(max |step mean - theirs|, log-variance) of one ``scheduler.step`` from ``x`` at ``t``, MONAI layout; the noise
    term (drawn from a known generator) taken off."""
    step, _ = scheduler.step(model_output, t, x, generator=torch.Generator().manual_seed(t))
    variance = torch.as_tensor(scheduler._get_variance(t), dtype=torch.float64)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
    mean = step - (variance.sqrt().float() * noise if t > 0 else 0.0)
    gap = float((mean.permute(0, 1, 4, 3, 2) - torch.from_numpy(reference[f"step_mean_t{t}"])).abs().max())
    return gap, float(torch.log(variance))


def test_one_reverse_step_of_the_paper_sampler_is_the_authors(scripts, reference):
    """One step of the 250-step ancestral sampler (inference.json's: float64 cosine schedule, x0 clipped to [-1, 1],
    fixed-small variance) from the same input gives the authors' step mean and log-variance, on their network's
    output and on the bundle network's. MONAI's float32 cosine schedule misses the mean by 4e-4 at t = 1."""
    network = converted_network(scripts)
    x, condition = to_monai(reference["noisy_image"]), to_monai(reference["mask"])
    scheduler = parsed("ancestral_scheduler", ("inference.json",))
    float32 = parsed("ancestral_scheduler", ("inference.json",), **{"ancestral_scheduler#schedule": "cosine"})
    np.testing.assert_allclose(scheduler.betas.numpy(), reference["betas"], rtol=0, atol=1e-7)
    worst_float32 = 0.0
    for t in reference["timesteps"].tolist():
        theirs = to_monai(reference[f"t{t}"])  # the sampler alone: their network's output
        gap, log_variance = step_mean_gap(scheduler, theirs, x, t, reference)
        assert gap <= 1e-6, (t, gap)
        assert log_variance == pytest.approx(float(reference[f"step_log_variance_t{t}"][0]), abs=1e-5), t
        worst_float32 = max(worst_float32, step_mean_gap(float32, theirs, x, t, reference)[0])
        with torch.no_grad():  # the whole step: the bundle's network, then its sampler
            ours = network(torch.cat([x, condition], dim=1), torch.full((x.shape[0],), t))
        gap, _ = step_mean_gap(scheduler, ours, x, t, reference)
        # the network's float32 rounding (2.7e-6) goes into x0 times sqrt(1 - ab) / sqrt(ab), largest at t = 249
        assert gap <= 5e-5, (t, gap)
    assert worst_float32 > 1e-4  # the float32 schedule is measurably not theirs: the test can fail


def convert(scripts, tmp_path, source=CHECKPOINT, network=None, **kwargs):
    network = network if network is not None else parsed("network_def", **SMALL)
    return scripts.convert_authors_checkpoint(str(source), network, str(tmp_path / "models" / "model.pt"), **kwargs)


def test_conversion_writes_weights_record_and_sidecar(scripts, tmp_path, capsys):
    target = convert(scripts, tmp_path)
    assert "126 tensors, 699,812 parameters" in capsys.readouterr().out
    state = load_checkpoint(target, require_record=True)  # the record matches (it raises otherwise)
    sidecar = json.loads((tmp_path / "models" / "model.json").read_text())
    assert sidecar["source_sha256"] == hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    assert sidecar["authors_key"] == "ema"
    # what inference.json builds loads it strictly and computes the authors' function
    network = parsed("network_def", ("inference.json",), **SMALL).eval()
    network.load_state_dict(state, strict=True)
    assert max_output_gap(network, dict(np.load(DATA / "authors_outputs.npz"))) <= 1e-5


def test_conversion_through_monais_runner(scripts, tmp_path):
    """The run id as a user runs it (in process): configs/train.json, --authors_checkpoint, the network keys."""
    import monai.bundle

    monai.bundle.run(
        "convert_authors_checkpoint",
        config_file=str(BUNDLE / "configs" / "train.json"),
        bundle_root=str(tmp_path),
        authors_checkpoint=str(CHECKPOINT),
        authors_key="model",
        **SMALL,
    )
    assert json.loads((tmp_path / "models" / "model.json").read_text())["authors_key"] == "model"
    assert (tmp_path / "models" / "model.pt.sha256").is_file()


def _refused(call, *fragments) -> str:
    with pytest.raises((ValueError, KeyError, OSError)) as info:
        call()
    root = expected_error(info.value)
    assert root is not None  # the runner prints it as the last line: error: <message>
    message = str(root)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_file_is_refused_and_nothing_written(scripts, tmp_path):
    broken = tmp_path / "model-10.pt"
    broken.write_bytes(CHECKPOINT.read_bytes()[: CHECKPOINT.stat().st_size // 2])
    _refused(lambda: convert(scripts, tmp_path, broken), str(broken), "cannot be read")
    assert not (tmp_path / "models").exists()


def test_checkpoint_without_ema_is_refused(scripts, tmp_path):
    raw_only = tmp_path / "raw.pt"
    torch.save({"step": 3, "model": torch.load(CHECKPOINT, weights_only=True)["model"]}, raw_only)
    _refused(lambda: convert(scripts, tmp_path, raw_only), str(raw_only), "'ema'", "--authors_key")
    assert not (tmp_path / "models").exists()
    convert(scripts, tmp_path, raw_only, authors_key="model")  # the raw weights are there
    assert (tmp_path / "models" / "model.pt").is_file()


def test_wrong_shape_is_refused_with_the_first_mismatch(scripts, tmp_path):
    with torch.device("meta"):
        paper_brats = parsed("network_def")  # the shipped 64-channel shape; the reference file is 32 channels wide
    _refused(
        lambda: convert(scripts, tmp_path, network=paper_brats),
        str(CHECKPOINT),
        "denoise_fn.time_embed.0.weight has shape (128, 32), this network expects (256, 64)",
        '--channels "[32, 32]"',
    )
    assert not (tmp_path / "models").exists()


def test_existing_weights_are_kept_unless_overwrite(scripts, tmp_path):
    target = tmp_path / "models" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"earlier weights")
    _refused(lambda: convert(scripts, tmp_path), str(target), "--overwrite true")
    assert target.read_bytes() == b"earlier weights"
    convert(scripts, tmp_path, overwrite=True)
    assert load_checkpoint(target, require_record=True)["conv_in.conv.weight"].shape == (32, 8, 3, 3, 3)


VARIANTS = {
    "brats": (("train.json",), 57.6e6, 8, 4),
    "whole_head": (("train.json", "single_modality.json"), 40.2e6, 3, 1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_paper_size_checkpoints_map_every_tensor(scripts, variant):
    """An authors'-format state dict of each shipped paper shape (the key names and shapes the mapping expects; meta
    tensors, no memory) converts and loads strictly; the other variant's file is refused, naming the overlay."""
    configs, params, in_channels, out_channels = VARIANTS[variant]
    with torch.device("meta"):
        network = parsed("network_def", configs)
        other = parsed("network_def", next(v[0] for k, v in VARIANTS.items() if k != variant))
    shapes = scripts.expected_shapes(network)
    authors = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert (
        authors["input_blocks.0.0.weight"].shape[1] == in_channels and authors["out.2.weight"].shape[0] == out_channels
    )
    scripts.check_layout(Path("paper.pt"), shapes, network)
    state = scripts.authors_to_monai(authors, network)
    network.load_state_dict(state, strict=True, assign=True)
    assert sum(v.numel() for v in state.values()) == pytest.approx(params, rel=1e-3)
    assert (
        scripts.describe(shapes)
        == scripts.shipped_shapes(BUNDLE / "configs")[" + ".join(f"configs/{c}" for c in configs)]
    )
    _refused(
        lambda: scripts.check_layout(Path("paper.pt"), shapes, other),
        "--config_file " + " + ".join(f"configs/{c}" for c in configs),
    )


def test_converted_checkpoint_runs_inference_unchanged(scripts, tmp_path, demo_cache_dir):
    """The converted weights go through the bundle's inference workflow as they are (simulated masks, 2 DDIM steps)."""
    import monai.bundle
    import nibabel as nib

    convert(scripts, tmp_path)
    cohort = {"n_subjects": 5, "spacing": 10.0, "seed": 0, "pathologies": ["glioblastoma"]}
    monai.bundle.run(
        "inference",
        config_file=str(BUNDLE / "configs" / "inference.json"),
        bundle_root=str(tmp_path),
        dataset_dir="demo",
        demo_cohort=cohort,
        cache_dir=str(demo_cache_dir),
        split="test",
        spatial_size=[24, 24, 16],
        sampler="ddim",
        num_inference_steps=2,
        progress=False,
        num_workers=0,
        **SMALL,
    )
    written = sorted((tmp_path / "outputs").glob("*/*-t1c.nii.gz"))
    assert written, list((tmp_path / "outputs").rglob("*"))
    assert all(np.isfinite(nib.load(f).get_fdata()).all() for f in written)

"""Med-DDPM's diffusion settings as the bundle configures them: the cosine schedule against its closed form, and
the fast sampler's timestep arithmetic at T = 250 (every previous timestep exact)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler

from brainsynth.schedulers.ddim import ExactDDIMScheduler

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_med_ddpm" / "configs"


def _parsed(config_file: str, key: str):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config_file))
    return parser.get_parsed_content(key)


def cosine_betas_closed_form(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),
    beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta), computed in float64."""
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos(((t / T) + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


@pytest.mark.parametrize(
    "config_file,key",
    [
        ("train.json", "train#scheduler"),
        ("inference.json", "ancestral_scheduler"),
        ("inference.json", "fast_scheduler"),
    ],
)
def test_bundle_schedules_are_the_cosine_closed_form(config_file, key):
    scheduler = _parsed(config_file, key)
    assert scheduler.num_train_timesteps == 250
    expected = cosine_betas_closed_form(250)
    # computed in float64 as the authors do (MONAI's float32 "cosine" is 4.6e-6 off: test_med_ddpm_authors.py)
    assert scheduler.betas.dtype == scheduler.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(scheduler.betas.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert float(scheduler.betas[-1]) == pytest.approx(0.999)  # the last beta is clipped, as in the authors' code
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-12, atol=1e-15)
    assert scheduler.prediction_type == "epsilon"


def test_ancestral_sampler_is_the_full_chain():
    scheduler = _parsed("inference.json", "ancestral_scheduler")
    assert isinstance(scheduler, DDPMScheduler) and scheduler.variance_type == "fixed_small" and scheduler.clip_sample
    scheduler.set_timesteps(250)
    assert scheduler.timesteps.tolist() == list(range(249, -1, -1))


@pytest.mark.parametrize("steps", [50, 10])
def test_fast_sampler_previous_timesteps_are_exact(steps):
    scheduler = _parsed("inference.json", "fast_scheduler")
    assert isinstance(scheduler, ExactDDIMScheduler)
    scheduler.set_timesteps(steps)
    seq = scheduler.timesteps.tolist()
    assert len(seq) == steps and seq[0] == 249 and seq[-1] == 0
    assert all(a > b for a, b in zip(seq, seq[1:]))
    assert [scheduler.previous_timestep(t) for t in seq] == seq[1:] + [-1]

    # each transition lands on the noise level of the true next timestep: with the exact noise as the network
    # output, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps goes to sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
    scheduler.clip_sample = False
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 4, 4, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(1, 4, 4, 4, 4, generator=g)
    ab = scheduler.alphas_cumprod
    for t, prev in zip(seq, seq[1:] + [-1]):
        x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        x_prev, _ = scheduler.step(eps, t, x_t)
        ab_prev = ab[prev] if prev >= 0 else torch.tensor(1.0)
        torch.testing.assert_close(x_prev, ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps, atol=2e-5, rtol=1e-4)

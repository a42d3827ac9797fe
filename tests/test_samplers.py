"""The exact-timestep DDIM sampler: its sequence, and that it follows the true noise levels."""

import pytest
import torch
from monai.inferers import DiffusionInferer

from brainsynth.schedulers.ddim import ExactDDIMScheduler, exact_timesteps


@pytest.mark.parametrize("steps", [250, 50, 10, 7, 1])
def test_every_previous_timestep_is_the_next_entry(steps):
    sched = ExactDDIMScheduler(num_train_timesteps=250, schedule="cosine")
    sched.set_timesteps(steps)
    seq = sched.timesteps.tolist()
    assert len(seq) == steps and len(set(seq)) == steps
    assert seq[0] == 249 and seq == sorted(seq, reverse=True)
    assert seq[-1] == (0 if steps > 1 else 249)
    assert [sched.previous_timestep(t) for t in seq] == seq[1:] + [-1]


def test_sequence_is_evenly_spread():
    seq = exact_timesteps(250, 50)
    gaps = (seq[:-1] - seq[1:]).tolist()
    assert set(gaps) <= {5, 6} and sum(gaps) == 249


def _trajectory_oracle(sched, x0, eps, kind):
    """A 'network' that returns the exact prediction for a sample lying on x_t = a x0 + s eps."""

    def net(x, t):
        ab = sched.alphas_cumprod[int(t)]
        if kind == "epsilon":
            return eps.clone()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v

    return net


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [50, 10])
def test_deterministic_sampling_stays_on_the_trajectory(kind, steps):
    # If each step lands exactly on the noise level of the next timestep, an exact predictor makes every
    # intermediate x_t equal a_t x0 + s_t eps and the last step returns x0. A wrong previous timestep breaks this.
    g = torch.Generator().manual_seed(0)
    # float64: the identity is exact arithmetic; a wrong previous timestep is off by ~1e-2, not 1e-9
    x0 = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    sched = ExactDDIMScheduler(num_train_timesteps=250, schedule="cosine", prediction_type=kind, clip_sample=False)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    t0 = int(sched.timesteps[0])
    ab = sched.alphas_cumprod[t0]
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    net = _trajectory_oracle(sched, x0, eps, kind)
    for t in sched.timesteps:
        x, x0_hat = sched.step(net(x, t), t, x)
        prev = sched.previous_timestep(t)
        if prev >= 0:
            ab_prev = sched.alphas_cumprod[prev]
            torch.testing.assert_close(x, ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(x, x0, atol=1e-9, rtol=1e-9)


def test_x0_transform_is_applied_and_noise_recomputed():
    sched = ExactDDIMScheduler(num_train_timesteps=100, schedule="linear_beta", clip_sample=False)
    sched.set_timesteps(10)
    x = torch.randn(1, 1, 4, 4)
    out = torch.randn(1, 1, 4, 4)
    t = sched.timesteps[0]
    plain, x0_plain = sched.step(out, t, x)
    same, _ = sched.step(out, t, x, x0_transform=lambda z: z)
    torch.testing.assert_close(plain, same)
    shifted, x0_shift = sched.step(out, t, x, x0_transform=lambda z: z + 1.0)
    torch.testing.assert_close(x0_shift, x0_plain + 1.0)
    # eps is re-derived from the transformed x0, so x_prev moves by (a_prev - s_prev * a_t / s_t) * 1.0
    ab_t = sched.alphas_cumprod[int(t)]
    ab_p = sched.alphas_cumprod[sched.previous_timestep(t)]
    coef = ab_p.sqrt() - (1 - ab_p).sqrt() * ab_t.sqrt() / (1 - ab_t).sqrt()
    torch.testing.assert_close(shifted - plain, torch.full_like(plain, float(coef)), atol=1e-5, rtol=1e-4)


def test_drop_in_for_monai_inferer():
    torch.manual_seed(0)
    sched = ExactDDIMScheduler(num_train_timesteps=250, schedule="cosine", clip_sample=False)
    sched.set_timesteps(10)
    calls = []

    def net(x, timesteps, context=None):
        calls.append(int(timesteps[0]))
        return torch.zeros_like(x)

    noise = torch.randn(1, 1, 4, 4)
    out = DiffusionInferer(sched).sample(noise, net, scheduler=sched, verbose=False)
    assert calls == sched.timesteps.tolist()
    # with a zero noise prediction the x0 estimate is x_T / a_T, carried to the clean image at the end
    torch.testing.assert_close(out, noise / sched.alphas_cumprod[249].sqrt(), atol=1e-4, rtol=1e-4)


def test_eta_one_is_the_ddpm_posterior_and_is_the_default_of_step():
    """With eta = 1 over consecutive timesteps, DDIM's added noise has the DDPM posterior variance
    beta_t (1 - ab_prev) / (1 - ab_t); the constructor's eta is what step() uses when none is passed."""
    from monai.networks.schedulers import DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=50, schedule="cosine", variance_type="fixed_small")
    stochastic = ExactDDIMScheduler(num_train_timesteps=50, schedule="cosine", clip_sample=False, eta=1.0)
    stochastic.set_timesteps(50)
    gen = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 1, 4, 4, generator=gen), torch.randn(1, 1, 4, 4, generator=gen)
    for t in (40, 10, 1):
        a, _ = stochastic.step(output, t, sample, generator=torch.Generator().manual_seed(3))
        b, _ = stochastic.step(output, t, sample, generator=torch.Generator().manual_seed(4))
        dz = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3)) - torch.randn(
            sample.shape, generator=torch.Generator().manual_seed(4)
        )
        std = (a - b) / dz  # the deterministic part cancels: what is left is std x (z1 - z2)
        torch.testing.assert_close(std, torch.full_like(std, float(ddpm._get_variance(t).sqrt())), rtol=1e-3, atol=1e-5)
    deterministic = ExactDDIMScheduler(num_train_timesteps=50, schedule="cosine", clip_sample=False)
    deterministic.set_timesteps(50)
    a, _ = deterministic.step(output, 40, sample, generator=torch.Generator().manual_seed(3))
    b, _ = deterministic.step(output, 40, sample, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eta"):
        ExactDDIMScheduler(num_train_timesteps=50, eta=1.5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_benchmark_pndm_override_samples_on_the_bundles_own_schedule(prediction_type):
    """ci/benchmark_samplers.py's ``pndm:N`` for Med-DDPM: MONAI's PNDM on the schedule and prediction type the
    bundle trains with (the float64 cosine since 0.7.0), not a schedule of its own."""
    import sys
    from pathlib import Path

    from monai.bundle import ConfigParser

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "ci"))
    import benchmark_samplers

    parser = ConfigParser()
    parser.read_config([str(repo / "bundles" / "brats_mri_med_ddpm" / "configs" / "inference.json")])
    parser["prediction_type"] = prediction_type
    for key, value in benchmark_samplers.spec_overrides("brats_mri_med_ddpm", "pndm:10").items():
        parser[key] = value
    pndm, trained = parser.get_parsed_content("fast_scheduler"), parser.get_parsed_content("ancestral_scheduler")
    assert type(pndm).__name__ == "PNDMScheduler"
    assert pndm.prediction_type == trained.prediction_type == prediction_type
    assert torch.equal(pndm.alphas_cumprod, trained.alphas_cumprod)

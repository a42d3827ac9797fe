"""diffusers' DPM-Solver++ and UniPC behind MONAI's scheduler interface, on the training schedule's own betas."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

pytest.importorskip("diffusers")

from brainsynth.schedulers.solvers import DiffusersSolver  # noqa: E402


class GaussianOracle(torch.nn.Module):
    """The exact noise prediction for data ~ N(mu, s^2) (independent voxels): at alpha-bar a, x_t ~ N(sqrt(a) mu,
    a s^2 + 1 - a) and eps = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def __init__(self, alphas_cumprod, mu=0.5, s=0.1):
        super().__init__()
        self.alphas_cumprod, self.mu, self.s = alphas_cumprod, mu, s
        self.calls = 0

    def forward(self, x, timesteps, context=None):
        self.calls += 1
        a = self.alphas_cumprod[timesteps.long()].to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


@pytest.mark.parametrize("solver", ["dpmsolver++", "unipc"])
def test_solvers_converge_to_the_data_distribution_through_monai(solver):
    """With the exact score, the solver run through MONAI's DiffusionInferer maps N(0, 1) onto the data's
    N(mu, s^2): one network call per step, and the spread converges to s as the steps grow (a narrow Gaussian is a
    stiff case: every sampler, DDIM included, under-disperses at 10 steps)."""
    training = DDPMScheduler(1000, schedule="cosine", prediction_type="epsilon")
    noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 25, 100):
        sampler = DiffusersSolver(solver, 1000, schedule="cosine")
        torch.testing.assert_close(sampler.solver.betas.double(), training.betas.double())  # the same schedule
        sampler.set_timesteps(steps)
        oracle = GaussianOracle(training.alphas_cumprod)
        out = DiffusionInferer(sampler).sample(noise, oracle, scheduler=sampler, verbose=False)
        assert oracle.calls == steps and abs(out.mean().item() - 0.5) < 0.005
        errors.append(abs(out.std().item() - 0.1))
        # the same scheduler object again: a new trajectory starts afresh (no solver history carried over)
        again = DiffusionInferer(sampler).sample(noise, oracle, scheduler=sampler, verbose=False)
        torch.testing.assert_close(again, out)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.005, errors


def test_unknown_solver_and_step_counts_are_refused():
    with pytest.raises(ValueError, match="one of"):
        DiffusersSolver("euler")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiffusersSolver().set_timesteps(0)

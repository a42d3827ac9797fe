"""Noise schedules that MONAI does not ship, registered in MONAI's ``NoiseSchedules`` registry.

Importing this module (``import brainsynth.schedulers.sigmoid``; bundle configs list it in ``imports``) makes the names
usable by every MONAI scheduler, e.g.
``DDIMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction")``.

``sigmoid_alpha_bar`` is the schedule D3M trains with (FACTS.md section 2): a sigmoid defined directly on the
cumulative signal level alpha-bar(t), t in [0, 1], rather than on beta as MONAI's ``sigmoid_beta`` is::

    alpha_bar(t) = (sigmoid(end / tau) - sigmoid((start + t (end - start)) / tau))
                   / (sigmoid(end / tau) - sigmoid(start / tau))

With start -3, end 3, tau 1 this gives alpha-bar 1 at t = 0, about 0.85 / 0.50 / 0.15 at t = 1/4, 1/2, 3/4 and 0 at
t = 1. Training step index i (0 .. T-1) has noise level t = (i + 1) / T, so index T-1 is (almost) pure noise.

Used by one bundle (D3M); kept in common because it is a noise schedule for MONAI's schedulers, not D3M code: any
bundle's config can name it once this module is imported.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import NoiseSchedules

SIGMOID_ALPHA_BAR = "sigmoid_alpha_bar"

#: betas are clipped here so the last step stays invertible (alpha-bar(1) would otherwise be exactly 0)
MAX_BETA = 0.999


def sigmoid_alpha_bar_curve(t: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """The continuous curve alpha-bar(t) for t in [0, 1] (float64 for exactness at the end points)."""
    if not end > start:
        raise ValueError(f"sigmoid_alpha_bar needs end > start, got start={start}, end={end}")
    if tau <= 0:
        raise ValueError(f"sigmoid_alpha_bar needs tau > 0, got {tau}")
    t = torch.as_tensor(t, dtype=torch.float64)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((start + t * (end - start)) / tau)) / (v_end - v_start)


@NoiseSchedules.add_def(SIGMOID_ALPHA_BAR, "Sigmoid on alpha-bar (D3M; start -3, end 3, tau 1), not on beta")
def _sigmoid_alpha_bar(num_train_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0):
    """Return (betas, alphas, alphas_cumprod) of the sigmoid alpha-bar schedule, in float32 like MONAI's."""
    t = torch.linspace(0, 1, num_train_timesteps + 1, dtype=torch.float64)
    alpha_bar = sigmoid_alpha_bar_curve(t, start, end, tau)
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, MAX_BETA)
    alphas = 1.0 - betas
    return betas.float(), alphas.float(), torch.cumprod(alphas, dim=0).float()

"""The cosine noise schedule computed in float64, registered in MONAI's ``NoiseSchedules`` as ``cosine_float64``.

MONAI's ``cosine`` computes alpha-bar in float32. Where alpha-bar is close to 1 (the last reverse steps) the float32
rounding of ``1 - alpha_bar`` is amplified in the clean-image estimate: against the Med-DDPM authors' schedule
(float64 numpy, stored as float32 buffers) MONAI's float32 betas differ by up to 4.6e-6 and one ancestral step at
t = 1 by 4e-4 (measured on the authors' reference outputs). Computing the schedule in float64, as they do, removes
that; the schedulers cast the coefficients to the sample's dtype when they apply them.

Importing this module (bundle configs list it in ``imports``) makes the name usable by every MONAI scheduler:
``DDPMScheduler(250, schedule="cosine_float64")``.

Used by one bundle (Med-DDPM); kept in common because it is a noise schedule for MONAI's schedulers, not Med-DDPM
code: any bundle's config can name it once this module is imported.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import NoiseSchedules

COSINE_FLOAT64 = "cosine_float64"


@NoiseSchedules.add_def(COSINE_FLOAT64, "Cosine schedule (Nichol & Dhariwal 2021) computed in float64")
def _cosine_float64(num_train_timesteps: int, s: float = 8e-3, max_beta: float = 0.999):
    """(betas, alphas, alphas_cumprod) in float64: MONAI's ``cosine`` formula, betas clipped at ``max_beta`` and
    alpha-bar recomputed from the clipped betas."""
    x = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=torch.float64)
    alpha_bar = torch.cos((x / num_train_timesteps + s) / (1 + s) * torch.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0.0, max_beta)
    alphas = 1.0 - betas
    return betas, alphas, torch.cumprod(alphas, dim=0)

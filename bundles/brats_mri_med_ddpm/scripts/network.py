"""The Med-DDPM denoiser: MONAI's ``DiffusionModelUNet`` computing the authors' function.

MONAI's U-Net of the authors' shape has their parameter count but not their function. Three settings make it theirs
(facts from their code, ``../shared/reference/med_ddpm_authors/README.md``; measured on their network's outputs):

* ``embedding_max_period``: the sinusoidal timestep embedding's longest period; the authors 1000, MONAI 10000;
* ``upsample_mode``: the interpolation before each up-sampling convolution; the authors ``trilinear``, MONAI
  ``nearest``;
* ``norm_eps`` (MONAI's own argument): GroupNorm epsilon; the authors PyTorch's default 1e-5, MONAI 1e-6.

The class defaults are MONAI's, so ``MedDDPMUNet(...)`` without them is MONAI's network; the bundle's configs set the
paper's values. None of them changes a parameter, so weights load either way (and compute different functions).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

#: MONAI's ``get_timestep_embedding`` default, which ``DiffusionModelUNet.forward`` uses
MONAI_MAX_PERIOD = 10000
UPSAMPLE_MODES = ("nearest", "trilinear", "bilinear", "linear")


class PeriodTimeEmbedding(nn.Sequential):
    """MONAI's time MLP (same modules, same state-dict keys) fed with an embedding of another period.

    ``DiffusionModelUNet.forward`` embeds the raw steps with period 10000 before calling ``time_embed``; the raw steps
    cannot be recovered from that embedding, so the owning network hands them over (``steps``) for the call."""

    def __init__(self, mlp: nn.Sequential, max_period: int) -> None:
        super().__init__(*mlp)
        self.max_period = int(max_period)
        self.steps: torch.Tensor | None = None

    def forward(self, monai_embedding: torch.Tensor) -> torch.Tensor:
        if self.steps is None:
            raise RuntimeError("PeriodTimeEmbedding is called by MedDDPMUNet.forward, which passes the timesteps")
        embedding = get_timestep_embedding(self.steps, monai_embedding.shape[-1], max_period=self.max_period)
        return super().forward(embedding.to(monai_embedding.dtype))


class MedDDPMUNet(DiffusionModelUNet):
    """``DiffusionModelUNet`` with the timestep-embedding period and up-sampling interpolation as settings.

    Args:
        embedding_max_period: longest period of the sinusoidal timestep embedding (Med-DDPM: 1000).
        upsample_mode: interpolation before each up-sampling convolution: ``nearest`` (MONAI) or ``trilinear``
            (Med-DDPM; ``bilinear`` / ``linear`` for 2-D / 1-D networks).
        *args, **kwargs: ``DiffusionModelUNet``'s (``norm_eps`` 1e-5 is Med-DDPM's GroupNorm epsilon).
    """

    def __init__(self, *args, embedding_max_period: int = MONAI_MAX_PERIOD, upsample_mode: str = "nearest", **kwargs):
        super().__init__(*args, **kwargs)
        if int(embedding_max_period) < 2:
            raise ValueError(f"embedding_max_period must be an integer >= 2, got {embedding_max_period!r}")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {', '.join(UPSAMPLE_MODES)}, got {upsample_mode!r}")
        self.embedding_max_period = int(embedding_max_period)
        self.upsample_mode = upsample_mode
        if self.embedding_max_period != MONAI_MAX_PERIOD:
            self.time_embed = PeriodTimeEmbedding(self.time_embed, self.embedding_max_period)
        for module in self.modules():
            if isinstance(module, nn.Upsample):  # the interpolation inside MONAI's up-sampling blocks
                module.mode = upsample_mode
                module.align_corners = None if upsample_mode == "nearest" else False  # F.interpolate's default

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(self.time_embed, PeriodTimeEmbedding):
            return super().forward(x, timesteps, *args, **kwargs)
        self.time_embed.steps = timesteps
        try:
            return super().forward(x, timesteps, *args, **kwargs)
        finally:
            self.time_embed.steps = None

"""Known-shift probe: does a deformer learn to undo a misplacement whose size and direction are known?

A denoiser that knows the clean target but places it ``shift`` px off along one axis (its clean estimate is the
target warped by a constant +``shift`` field, so the correcting field is -``shift``) is wrapped with a fresh
deformer in ``DeformableDenoiser`` and trained through the bundle's own pieces: ``MSSDMInferer``'s training call,
``WeightedDiffusionLoss`` (alpha-bar weighting + smoothness) and Adam, with the D3M noise schedule. The answer is the
mean field inside the enhancing tumour. Images are 32 x 32 slices: a textured "brain", one disk of enhancement
(T1ce bright, mask +1) at a random place; the condition is the clean target itself (only the frozen oracle reads it).

``trainable_denoiser=True`` adds a learnable correction (a small U-Net whose output starts at zero) to the
misplacing oracle and trains it with the deformer, the joint training of D3M: it measures whether the denoiser
absorbs the shift and leaves the deformer nothing to learn.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn

import brainsynth.schedulers.sigmoid  # noqa: F401  (registers the D3M schedule "sigmoid_alpha_bar")

from .estimation import DeformationUNet, make_warp
from .mssdm import DeformableDenoiser, MSSDMInferer, WeightedDiffusionLoss, prediction_from_x0

SIZE = 32


def toy_targets(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 2, 32, 32) clean targets in [-1, 1]: T1ce (textured brain, bright enhancing disk) and its mask."""
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    centre = 10 + 12 * torch.rand(batch, 2, generator=generator)
    radius = 3.5 + 2.5 * torch.rand(batch, generator=generator)
    inside = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) <= radius[:, None, None] ** 2
    brain = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2) <= 14**2
    texture = 0.15 * torch.sin(yy / 2.5 + 6 * torch.rand(batch, 1, 1, generator=generator)) * torch.cos(xx / 3.0)
    t1ce = torch.where(brain, -0.2 + texture, torch.full_like(texture, -1.0))
    t1ce = torch.where(inside, torch.full_like(t1ce, 0.9), t1ce)
    mask = inside.float() * 2 - 1
    return torch.stack([t1ce, mask], dim=1)


class MisplacingOracle(nn.Module):
    """A frozen "denoiser" whose clean estimate is the true target (read from the condition) moved by ``shift`` px
    along ``axis`` (Warp's convention: estimate(x) = target(x + shift)); it returns the output that estimate
    implies at the noisy input. ``correction`` (optional, trainable) is added to that output."""

    def __init__(self, scheduler: DDPMScheduler, shift: float, axis: int = 1, correction: nn.Module | None = None):
        super().__init__()
        self.scheduler, self.shift, self.axis = scheduler, float(shift), int(axis)
        self.warp = make_warp()
        self.correction = correction

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        noisy, truth = x[:, :2], x[:, 2:4]
        field = torch.zeros(truth.shape[0], 2, *truth.shape[2:], device=x.device)
        field[:, self.axis] = self.shift
        alpha_bar = self.scheduler.alphas_cumprod.to(x.device)[timesteps]
        out = prediction_from_x0(self.warp(truth, field), noisy.float(), alpha_bar, self.scheduler.prediction_type)
        return out if self.correction is None else out + self.correction(x)


def _zero_init_unet() -> nn.Module:
    net = BasicUNet(2, in_channels=4, out_channels=2, features=(16, 16, 32, 32, 32, 16), norm=None)
    nn.init.zeros_(net.final_conv.weight)
    nn.init.zeros_(net.final_conv.bias)
    return net


def known_shift_probe(
    shift: float = 3.0,
    warp_target: str = "x0",
    iterations: int = 200,
    batch: int = 8,
    learning_rate: float = 1e-3,
    trainable_denoiser: bool = False,
    amp: bool = False,
    seed: int = 0,
    log_every: int = 0,
) -> dict:
    """Train the deformer (and, with ``trainable_denoiser``, the oracle's correction) for ``iterations`` and return
    {"field_in_tumour_px": mean field along the shifted axis inside the true enhancing mask of held-out targets,
    "expected_px": -shift, "history": [(iteration, field_in_tumour_px), ...] every ``log_every``}."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(1000, "sigmoid_alpha_bar", prediction_type="v_prediction")
    correction = _zero_init_unet() if trainable_denoiser else None
    oracle = MisplacingOracle(scheduler, shift, correction=correction)
    network = DeformableDenoiser(
        oracle, DeformationUNet(2, features=(8, 8, 16, 16, 16, 8)), target_channels=2, warp_target=warp_target
    )
    inferer = MSSDMInferer(scheduler, amp=amp)
    loss_fn = WeightedDiffusionLoss(smoothness_weight=1.0)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=learning_rate)
    held_out = toy_targets(16, torch.Generator().manual_seed(seed + 1000))

    def field_in_tumour() -> float:
        t = torch.full((held_out.shape[0],), 200, dtype=torch.long)
        noise = torch.randn(held_out.shape, generator=torch.Generator().manual_seed(seed + 2000))
        with torch.no_grad():
            out = inferer(held_out, network, noise, t, condition=held_out)
        inside = held_out[:, 1] > 0
        return float(out["field"][:, 1][inside].mean())

    history = []
    for it in range(1, iterations + 1):
        target = toy_targets(batch, generator)
        noise = torch.randn(target.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        output = inferer(target, network, noise, t, condition=target)
        loss = loss_fn(output, scheduler.get_velocity(target, noise, t))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        if log_every and it % log_every == 0:
            history.append((it, field_in_tumour()))
    return {"field_in_tumour_px": field_in_tumour(), "expected_px": -float(shift), "history": history}

"""Learned spatial deformation, 2D and 3D: a small field-estimation U-Net, warping, and a smoothness penalty.

D3M's multi-step spatial deformation module (MSSDM) corrects enhancement errors geometrically: a small U-Net reads
the current tumour-mask estimate and outputs a dense displacement field (in voxels), which warps the prediction.
The pieces here are generic; brainsynth.deformation.mssdm wires them into training and sampling.

Conventions are MONAI's ``Warp``: ``ddf`` has shape (B, spatial_dims, *spatial), channel k is the displacement
along spatial axis k in voxels, and ``warped(x) = image(x + ddf(x))`` (so a field of +1 along an axis moves content
by one voxel towards the start of that axis).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import torch
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.nets import BasicUNet
from torch import nn

from brainsynth.engine.acceleration import without_autocast


class DeformationUNet(nn.Module):
    """Estimate a displacement field from a (mask) image: MONAI's BasicUNet with a near-zero output layer.

    The last convolution starts with weights ~ N(0, ``init_std``) and zero bias, so at initialisation the field is
    (almost) zero and warping is (almost) the identity; training grows it only where it lowers the loss.
    With ``integration_steps`` > 0 the output is read as a stationary velocity field and integrated by scaling and
    squaring (MONAI's DVF2DDF) into a diffeomorphic displacement - an extension; D3M uses the raw field (0).

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: channels of the guiding image (1: the mask estimate).
        features: BasicUNet's six feature sizes (five encoder levels + the last decoder level). The default,
            (16, 16, 32, 32, 32, 16), has 0.13 M parameters in 2D, close to the authors' VoxelMorph-style 0.1 M.
        init_std: standard deviation of the initial output-layer weights.
        integration_steps: 0 for a displacement field; n > 0 integrates a velocity field in n squaring steps.
        norm, act: BasicUNet normalisation and activation; like VoxelMorph, no normalisation by default (which
            also lets inputs as small as 16 pixels through the 4 poolings).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        features: Sequence[int] = (16, 16, 32, 32, 32, 16),
        init_std: float = 1e-5,
        integration_steps: int = 0,
        norm: str | tuple | None = None,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.2, "inplace": True}),
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"DeformationUNet supports 2 or 3 spatial dims, got {spatial_dims}")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        self.spatial_dims = spatial_dims
        self.unet = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=spatial_dims,
            features=tuple(features),
            norm=norm,
            act=act,
        )
        nn.init.normal_(self.unet.final_conv.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.unet.final_conv.bias)
        self.integrate = None
        if integration_steps:
            with _quiet_native_warp():
                self.integrate = DVF2DDF(num_steps=integration_steps, padding_mode="border")
            self.integrate.warp_layer = make_warp("bilinear", "border")  # its squaring steps in float32 too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"DeformationUNet({self.spatial_dims}D) expects "
                f"(B, C, {'H, W' if self.spatial_dims == 2 else 'H, W, D'}), "
                f"got shape {tuple(x.shape)}"
            )
        field = self.unet(x)
        return self.integrate(field) if self.integrate is not None else field


@contextlib.contextmanager
def _quiet_native_warp():
    """Silence Warp's per-construction "native grid_sample" warning (expected on builds without MONAI's C++ ops)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*native grid_sample.*")
        yield


class Float32Warp(Warp):
    """MONAI's Warp, computed in float32 whatever the autocast around it and the inputs' dtypes.

    Warp builds its reference grid in the field's dtype and adds the displacement to it: with a bf16 field (a
    deformer's output under autocast) a 0.05 px displacement moves pixels by 0.05-0.11 px, and coordinates near 200
    cannot hold 0.1 px at all. Here image and field are cast to float32 and autocast is off inside; the result is
    float32.
    """

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        with without_autocast(image):
            return super().forward(image.float(), ddf.float())


def make_warp(mode: str = "bilinear", padding_mode: str = "border") -> Warp:
    """MONAI's Warp in float32 (``Float32Warp``, quietly constructed).

    ``padding_mode="border"`` repeats edge values, so background (-1 after scaling) stays background when content
    is pulled in from outside the image; zero padding would inject mid-grey.
    """
    with _quiet_native_warp():
        return Float32Warp(mode=mode, padding_mode=padding_mode)


def smoothness_loss(ddf: torch.Tensor, weights: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Squared forward differences of a displacement field along every spatial axis (first-order "grad-l2" penalty).

    Per sample: the mean over spatial axes of the mean squared difference between neighbouring voxels, averaged
    over the field's components - the D3M authors' ``gradient_loss`` (voxelmorph's grad-l2: per axis the mean of the
    squared differences over every element, then the mean over axes). A constant field (any translation) costs 0.

    Args:
        ddf: (B, spatial_dims, *spatial) field.
        weights: optional (B,) per-sample weights (D3M: alpha-bar of each sample's timestep).
        reduction: "mean" (weighted mean over the batch), "sum", or "none" (the (B,) weighted values).
    """
    spatial_dims = ddf.ndim - 2
    if spatial_dims < 1 or ddf.shape[1] != spatial_dims:
        raise ValueError(f"smoothness_loss expects a (B, spatial_dims, *spatial) field, got shape {tuple(ddf.shape)}")
    per_sample = ddf.new_zeros(ddf.shape[0])
    for axis in range(2, ddf.ndim):
        diff = torch.diff(ddf, dim=axis)
        if diff.numel():
            per_sample = per_sample + diff.pow(2).flatten(1).mean(dim=1)
    per_sample = per_sample / spatial_dims
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=per_sample.dtype, device=per_sample.device).reshape(-1)
        if weights.shape[0] != per_sample.shape[0]:
            raise ValueError(f"smoothness_loss: {weights.shape[0]} weights for a batch of {per_sample.shape[0]}")
        per_sample = per_sample * weights
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

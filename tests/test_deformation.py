"""Deformation layers: MONAI Warp conventions, the field-estimation U-Net, and the smoothness penalty."""

import pytest
import torch

from brainsynth.deformation.estimation import DeformationUNet, make_warp, smoothness_loss


@pytest.mark.parametrize("shape", [(2, 3, 12, 10), (1, 2, 8, 9, 7)])
def test_warp_is_identity_at_zero_displacement(shape):
    torch.manual_seed(0)
    image = torch.randn(shape)
    ddf = torch.zeros(shape[0], len(shape) - 2, *shape[2:])
    torch.testing.assert_close(make_warp()(image, ddf), image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spatial", [(12, 10), (8, 9, 7)])
@pytest.mark.parametrize("axis,shift", [(0, 2), (1, -3)])
def test_integer_shift_moves_content_by_exactly_that_many_voxels(spatial, axis, shift):
    torch.manual_seed(1)
    image = torch.randn(1, 1, *spatial)
    ddf = torch.zeros(1, len(spatial), *spatial)
    ddf[:, axis] = shift
    warped = make_warp(mode="bilinear", padding_mode="zeros")(image, ddf)
    n = spatial[axis]
    # warped(x) = image(x + shift): compare the overlap, and the part pulled from outside is zero-padded
    inside = slice(max(0, -shift), n - max(0, shift))
    source = slice(max(0, shift), n + min(0, shift))
    torch.testing.assert_close(
        warped.narrow(axis + 2, inside.start, inside.stop - inside.start),
        image.narrow(axis + 2, source.start, source.stop - source.start),
        atol=1e-5,
        rtol=0,
    )
    outside = torch.ones(n, dtype=torch.bool)
    outside[inside] = False
    assert warped.index_select(axis + 2, outside.nonzero().flatten()).abs().max() < 1e-6


def test_smoothness_is_zero_for_a_constant_field_and_exact_for_a_ramp():
    const = torch.full((2, 2, 9, 11), 3.7)
    assert smoothness_loss(const).item() == 0.0
    const3d = torch.randn(2, 3, 1, 1, 1).expand(2, 3, 5, 6, 7)
    assert smoothness_loss(const3d).item() == 0.0
    # u_0(x) = a * x (along axis 0), u_1 = 0: along axis 0 the squared differences are a^2 (component 0) and 0
    # (component 1), mean a^2 / 2; along axis 1 all 0; the mean over the two axes: a^2 / 4
    a = 0.3
    ramp = torch.zeros(1, 2, 9, 11)
    ramp[0, 0] = a * torch.arange(9.0)[:, None]
    torch.testing.assert_close(smoothness_loss(ramp), torch.tensor(a * a / 4))


def _authors_gradient_loss(s):
    """The D3M authors' 2D ``gradient_loss`` (voxelmorph grad-l2), written out: per axis the mean over every element
    of the squared forward differences, then the mean of the two axes."""
    dy = (s[:, :, 1:, :] - s[:, :, :-1, :]) ** 2
    dx = (s[:, :, :, 1:] - s[:, :, :, :-1]) ** 2
    return (dx.mean() + dy.mean()) / 2.0


def test_smoothness_equals_the_authors_gradient_loss_on_a_random_field():
    field = torch.randn(3, 2, 17, 13, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(smoothness_loss(field), _authors_gradient_loss(field))


def test_smoothness_per_sample_weights():
    torch.manual_seed(2)
    fields = torch.randn(3, 2, 8, 8)
    per_sample = smoothness_loss(fields, reduction="none")
    assert per_sample.shape == (3,) and (per_sample > 0).all()
    weights = torch.tensor([0.0, 1.0, 0.5])
    torch.testing.assert_close(smoothness_loss(fields, weights), (per_sample * weights).mean())
    with pytest.raises(ValueError, match="2 weights for a batch of 3"):
        smoothness_loss(fields, torch.ones(2))


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 24)), (3, (16, 16, 16))])
def test_deformation_unet_starts_near_identity_and_learns(spatial_dims, size):
    torch.manual_seed(3)
    net = DeformationUNet(spatial_dims, features=(4, 4, 8, 8, 8, 4))
    mask = torch.randn(2, 1, *size)
    field = net(mask)
    assert field.shape == (2, spatial_dims, *size)
    assert field.abs().max() < 1e-2
    field.pow(2).sum().backward()
    assert net.unet.final_conv.weight.grad.abs().sum() > 0


def test_velocity_integration_of_a_constant_field_is_that_translation():
    net = DeformationUNet(2, features=(4, 4, 8, 8, 8, 4), integration_steps=5)
    torch.nn.init.zeros_(net.unet.final_conv.weight)
    with torch.no_grad():
        net.unet.final_conv.bias.copy_(torch.tensor([1.0, -2.0]))
    field = net(torch.zeros(1, 1, 16, 16))
    # a stationary velocity that is constant integrates to the same constant displacement (border padding)
    torch.testing.assert_close(field[0, 0], torch.ones(16, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(field[0, 1], torch.full((16, 16), -2.0), atol=1e-5, rtol=0)

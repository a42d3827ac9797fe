"""Dual-stream image/mask decoder (DSIMD) built from MONAI's DiffusionModelUNet blocks."""

import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)
from monai.networks.nets import DiffusionModelUNet

bundle_scripts("brats_mri_d3m_cemri")  # the bundle's own code, importable as brats_mri_d3m_cemri_scripts
from brats_mri_d3m_cemri_scripts.dual_stream_unet import DualStreamDiffusionUNet  # noqa: E402

TINY = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8)


def test_single_decoder_is_exactly_monai_diffusion_unet():
    torch.manual_seed(0)
    single = DualStreamDiffusionUNet(2, in_channels=5, out_channels=2, num_decoders=1, **TINY)
    plain = DiffusionModelUNet(2, in_channels=5, out_channels=2, **TINY)
    plain.load_state_dict(single.state_dict())  # strict: same parameter names and shapes
    x, t = torch.randn(2, 5, 16, 16), torch.tensor([1, 900])
    torch.testing.assert_close(single(x, t), plain(x, t), atol=0, rtol=0)


def test_streams_share_the_encoder_and_have_independent_decoders():
    torch.manual_seed(1)
    net = DualStreamDiffusionUNet(2, in_channels=5, out_channels=2, num_decoders=2, **TINY)
    # MONAI zero-initialises the output convolutions; give them weights so both streams are non-trivial
    for _, out in net.decoders():
        torch.nn.init.normal_(out[-1].conv.weight, std=0.1)
    x, t = torch.randn(2, 5, 16, 16), torch.tensor([10, 500])
    y = net(x, t)
    assert y.shape == (2, 2, 16, 16)
    assert not torch.allclose(y[:, 0], y[:, 1])
    # changing the mask decoder leaves the image stream untouched, and vice versa
    with torch.no_grad():
        for p in net.extra_decoders.parameters():
            p.add_(0.05)
    y2 = net(x, t)
    torch.testing.assert_close(y2[:, 0], y[:, 0], atol=0, rtol=0)
    assert not torch.allclose(y2[:, 1], y[:, 1])
    # the shared trunk exists once: one encoder, two decoders
    n_enc = sum(p.numel() for p in net.down_blocks.parameters())
    n_dec = sum(p.numel() for p in net.up_blocks.parameters())
    assert sum(p.numel() for p in net.extra_decoders.parameters()) > n_dec > 0 and n_enc > 0


def test_each_loss_reaches_only_its_own_decoder_and_the_shared_encoder():
    torch.manual_seed(2)
    net = DualStreamDiffusionUNet(2, in_channels=5, out_channels=2, num_decoders=2, **TINY)
    for _, out in net.decoders():
        torch.nn.init.normal_(out[-1].conv.weight, std=0.1)
    x, t = torch.randn(2, 5, 16, 16), torch.tensor([3, 700])
    net(x, t)[:, 1].pow(2).mean().backward()  # mask stream only
    grad = lambda mods: sum(p.grad.abs().sum().item() for p in mods.parameters() if p.grad is not None)
    assert grad(net.extra_decoders) > 0 and grad(net.down_blocks) > 0
    assert grad(net.up_blocks) == 0 and grad(net.out) == 0


def test_invalid_split_is_rejected():
    with pytest.raises(ValueError, match="cannot be split evenly"):
        DualStreamDiffusionUNet(2, in_channels=5, out_channels=3, num_decoders=2, **TINY)

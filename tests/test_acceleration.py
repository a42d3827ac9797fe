"""Acceleration switches change speed and memory, never the numbers or the checkpoint format."""

import copy

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from brainsynth.acceleration import accelerate


def _unet():
    return DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=1, channels=(8, 16), num_res_blocks=1,
                              attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)


def _loss_and_grads(net, x, t):
    net.zero_grad()
    out = net(x, timesteps=t)
    out.square().mean().backward()
    # parameter order is the same with or without wrappers (only the names gain a wrapper prefix)
    return out.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_checkpointing_keeps_outputs_gradients_and_state_dict(channels_last):
    torch.manual_seed(0)
    plain = _unet()
    fast = accelerate(copy.deepcopy(plain), activation_checkpointing=True, channels_last=channels_last)
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints interchangeable
    wrapped = [m for m in fast.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) >= 4
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 7])
    out_a, grads_a = _loss_and_grads(plain, x, t)
    out_b, grads_b = _loss_and_grads(fast, x, t)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-4)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-3)
    # and a plain network loads the accelerated one's weights
    _unet().load_state_dict(fast.state_dict())


def test_autoencoder_blocks_are_found():
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                       num_res_blocks=(1, 1), norm_num_groups=4, attention_levels=(False, False))
    accelerate(ae, activation_checkpointing=True)
    assert any(type(m).__name__ == "CheckpointWrapper" for m in ae.modules())


def test_nothing_to_checkpoint_is_an_error():
    with pytest.raises(ValueError, match="no checkpointable block"):
        accelerate(torch.nn.Linear(2, 2), activation_checkpointing=True)

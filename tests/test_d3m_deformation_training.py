"""D3M's deformation in training: the warp's precision under autocast, the x0 warp target, the frozen-denoiser phase,
and the known-shift probe that says which formulation learns to undo a misplacement (docs: The deformation)."""

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

import brainsynth.schedulers.sigmoid  # noqa: F401  (registers "sigmoid_alpha_bar")
from brainsynth.deformation.estimation import DeformationUNet, make_warp
from brainsynth.deformation.known_shift import known_shift_probe
from brainsynth.deformation.mssdm import DeformableDenoiser, freeze_trained_denoiser, predict_x0, prediction_from_x0
from brainsynth.engine.io import save_checkpoint


@pytest.mark.parametrize("image_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [0.05, 0.3, -0.7])
def test_a_constant_subpixel_field_under_cpu_bf16_autocast_moves_a_ramp_by_its_value(shift, image_dtype):
    """A deformer under autocast returns a bf16 field; MONAI's Warp would build its grid in bf16, where coordinates
    near 200 cannot hold a 0.1 px displacement. The warp must move the ramp by the field's value to 1e-3 px."""
    width = 256
    ramp = torch.arange(width, dtype=torch.float32).expand(1, 1, 8, width).to(image_dtype)  # integers: exact in bf16
    field = torch.zeros(1, 2, 8, width, dtype=torch.bfloat16)
    field[:, 1] = shift
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped = make_warp()(ramp, field)
    assert warped.dtype == torch.float32
    moved = (warped - ramp.float())[..., 1:-1]  # warped(x) = ramp(x + u) = x + u away from the border
    assert (moved - field[:, 1:2, :, 1:-1].float()).abs().max() < 1e-3


class _ConvDenoiser(torch.nn.Conv2d):
    def forward(self, x, timesteps):
        return super().forward(x)


def _network(warp_target):
    torch.manual_seed(0)
    denoiser = _ConvDenoiser(5, 2, 3, padding=1)
    return DeformableDenoiser(
        denoiser, DeformationUNet(2, features=(4, 4, 8, 8, 8, 4), init_std=0.5), warp_target=warp_target
    )


def test_the_x0_warp_target_rederives_the_velocity_from_the_warped_clamped_estimate_as_sampling_does():
    net = _network("x0")
    x, t = torch.randn(2, 5, 16, 16), torch.tensor([30, 700])
    ab = DDPMScheduler(1000, "sigmoid_alpha_bar", prediction_type="v_prediction").alphas_cumprod[t]
    velocity, field = net(x, t, alpha_bar=ab)
    x0 = predict_x0(net.denoiser(x, t), x[:, :2], ab).clamp(-1, 1)
    torch.testing.assert_close(field, net.deformer(x0[:, 1:2]))
    assert field.abs().mean() > 0.05  # a field that moves something, so the warp is exercised
    warped = make_warp()(x0, field)
    torch.testing.assert_close(velocity, prediction_from_x0(warped, x[:, :2], ab))
    torch.testing.assert_close(predict_x0(velocity, x[:, :2], ab), warped, atol=1e-5, rtol=1e-5)  # round trip
    with pytest.raises(ValueError, match="warp_target"):
        _network("velocity")


def test_freezing_a_trained_denoiser_loads_it_exactly_and_leaves_only_the_deformer_trainable(tmp_path):
    trained = _network("x0")
    trained.deformer = None  # a no_mssdm model: the denoiser alone
    torch.nn.init.normal_(trained.denoiser.weight)
    path = tmp_path / "model_no_mssdm.pt"
    save_checkpoint(trained.state_dict(), path, record=True)
    net = freeze_trained_denoiser(_network("x0"), str(path))
    torch.testing.assert_close(net.denoiser.weight, trained.denoiser.weight, atol=0, rtol=0)
    assert not any(p.requires_grad for p in net.denoiser.parameters())
    assert all(p.requires_grad for p in net.deformer.parameters())
    assert freeze_trained_denoiser(_network("x0"), None).denoiser.weight.requires_grad  # None: all train
    save_checkpoint({"deformer.x": torch.zeros(1)}, tmp_path / "other.pt", record=True)
    with pytest.raises(ValueError, match="no denoiser weights"):
        freeze_trained_denoiser(_network("x0"), str(tmp_path / "other.pt"))


@pytest.mark.parametrize("shift,amp", [(3.0, False), (-2.0, True)])
def test_known_shift_the_x0_deformer_learns_the_correction_in_the_tumour(shift, amp):
    """A frozen denoiser places the enhancement ``shift`` px off; trained through MSSDMInferer and
    WeightedDiffusionLoss with the x0 warp target, the deformer learns -shift inside the tumour (bf16 autocast too)."""
    result = known_shift_probe(shift, warp_target="x0", iterations=200, amp=amp)
    assert result["field_in_tumour_px"] == pytest.approx(-shift, abs=0.5)


def test_known_shift_the_papers_velocity_warp_does_not_learn_the_correction():
    """The paper's (and the authors' code's) training warps the predicted velocity, which holds the noisy input that
    already lines up with the target: on the same probe it moves the wrong way (+1.0 px at seed 0), far from -3."""
    result = known_shift_probe(3.0, warp_target="prediction", iterations=200)
    assert 0.0 < result["field_in_tumour_px"] < 2.0

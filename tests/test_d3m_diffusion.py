"""D3M diffusion: sigmoid alpha-bar schedule, v-prediction algebra, the weighted loss, and the MSSDM sampler."""

from pathlib import Path

import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

import brainsynth.schedulers.sigmoid  # noqa: F401  (registers "sigmoid_alpha_bar")
from brainsynth.deformation.estimation import DeformationUNet, make_warp, smoothness_loss
from brainsynth.deformation.mssdm import DeformableDenoiser, MSSDMInferer, WeightedDiffusionLoss, predict_x0
from brainsynth.schedulers.ddim import ExactDDIMScheduler
from brainsynth.schedulers.sigmoid import sigmoid_alpha_bar_curve

bundle_scripts("brats_mri_d3m_cemri")  # the bundle's own code, importable as brats_mri_d3m_cemri_scripts
from brats_mri_d3m_cemri_scripts.dual_stream_unet import DualStreamDiffusionUNet  # noqa: E402

TINY = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8)


def d3m_scheduler(**kw):
    return DDPMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction", **kw)


# --- schedule -----------------------------------------------------------------------------------------------
def test_sigmoid_alpha_bar_endpoints_monotonicity_and_midpoints():
    t = torch.linspace(0, 1, 101)
    curve = sigmoid_alpha_bar_curve(t)
    assert curve[0].item() == pytest.approx(1.0, abs=1e-12) and curve[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (curve.diff() < 0).all()
    ab = d3m_scheduler().alphas_cumprod
    assert ab.shape == (1000,) and (ab.diff() < 0).all()
    assert 0.999 < ab[0] <= 1.0 and ab[-1] < 1e-3
    # FACTS.md section 2: about 0.85 / 0.50 / 0.15 a quarter, half and three quarters of the way
    for step, expected in [(249, 0.85), (499, 0.50), (749, 0.15)]:
        assert ab[step].item() == pytest.approx(expected, abs=0.01)
    # it is not MONAI's sigmoid_beta (a sigmoid on beta gives a different alpha-bar curve)
    other = DDPMScheduler(1000, schedule="sigmoid_beta").alphas_cumprod
    assert (other[499] - ab[499]).abs() > 0.05


def test_schedule_arguments_are_validated():
    with pytest.raises(ValueError, match="end > start"):
        DDPMScheduler(100, schedule="sigmoid_alpha_bar", start=3.0, end=-3.0)


# --- v-prediction algebra -----------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 1, 250, 500, 999])
def test_x0_and_noise_are_recovered_exactly_from_xt_and_v(step):
    gen = torch.Generator().manual_seed(step)
    scheduler = d3m_scheduler()
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    x0 = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.full((3,), step, dtype=torch.long)
    xt = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    ab = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(predict_x0(v, xt, ab, "v_prediction"), x0, atol=1e-10, rtol=0)
    # the sampler's own split (float64 copy of the same schedule) recovers both
    ddim = ExactDDIMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction")
    ddim.alphas_cumprod = scheduler.alphas_cumprod
    x0_hat, eps_hat = ddim.split_prediction(v, step, xt)
    torch.testing.assert_close(x0_hat, x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=1e-10, rtol=0)


# --- network + loss -----------------------------------------------------------------------------------------
def tiny_d3m(num_decoders=2, deformer=True, seed=0):
    torch.manual_seed(seed)
    denoiser = DualStreamDiffusionUNet(2, in_channels=5, out_channels=2, num_decoders=num_decoders, **TINY)
    for _, out in denoiser.decoders():  # MONAI zero-initialises output heads; make the streams non-trivial
        torch.nn.init.normal_(out[-1].conv.weight, std=0.05)
    field_net = DeformationUNet(2, features=(4, 4, 8, 8, 8, 4), init_std=1e-2) if deformer else None
    return DeformableDenoiser(denoiser, field_net)


def test_full_d3m_loss_reaches_both_decoders_and_the_deformer():
    net = tiny_d3m()
    scheduler = d3m_scheduler()
    inferer = MSSDMInferer(scheduler, num_inference_steps=5)
    target = torch.rand(4, 2, 16, 16) * 2 - 1
    noise, cond = torch.randn_like(target), torch.randn(4, 3, 16, 16)
    t = torch.tensor([5, 300, 600, 990])
    out = inferer(target, net, noise=noise, timesteps=t, condition=cond)
    assert out["pred"].shape == target.shape and out["field"].shape == (4, 2, 16, 16)
    torch.testing.assert_close(out["alpha_bar"], scheduler.alphas_cumprod[t])
    loss = WeightedDiffusionLoss(smoothness_weight=1.0)(out, scheduler.get_velocity(target, noise, t))
    loss.backward()
    for name, module in [
        ("image decoder", net.denoiser.up_blocks),
        ("mask decoder", net.denoiser.extra_decoders),
        ("encoder", net.denoiser.down_blocks),
        ("deformer", net.deformer),
    ]:
        assert sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None) > 0, name


def test_weighted_loss_is_alpha_bar_weighted_mse_plus_weighted_smoothness():
    torch.manual_seed(4)
    pred, target, field = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    ab = torch.tensor([0.9, 0.5, 0.1])
    per_sample_mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    expected = (ab * per_sample_mse).mean() + 0.7 * smoothness_loss(field, ab)
    got = WeightedDiffusionLoss(0.7)({"pred": pred, "field": field, "alpha_bar": ab}, target)
    torch.testing.assert_close(got, expected)
    plain = WeightedDiffusionLoss(weighting="none")({"pred": pred, "field": None, "alpha_bar": ab}, target)
    torch.testing.assert_close(plain, per_sample_mse.mean())


def test_training_warps_the_predicted_velocity_with_the_field_of_the_mask_estimate():
    net = tiny_d3m()
    x, t = torch.randn(2, 5, 16, 16), torch.tensor([100, 800])
    ab = d3m_scheduler().alphas_cumprod[t]
    warped, field = net(x, t, alpha_bar=ab)
    v = net.denoiser(x, t)
    mask_estimate = predict_x0(v, x[:, :2], ab)[:, 1:2].clamp(-1, 1)
    torch.testing.assert_close(field, net.deformer(mask_estimate))
    torch.testing.assert_close(warped, make_warp()(v, field))


def test_the_deformer_sees_a_clamped_mask_estimate_in_training_as_in_sampling():
    """The authors clamp x0 to [-1, 1] before the deformation network; an extreme noisy input must not reach it
    unclamped (sampling clamps too, so both see the same range)."""
    net = tiny_d3m()
    seen = []
    net.deformer.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    x, t = torch.randn(2, 5, 16, 16) * 50, torch.tensor([5, 990])
    net(x, t, alpha_bar=d3m_scheduler().alphas_cumprod[t])
    assert seen and seen[0].abs().max() <= 1.0
    raw = predict_x0(net.denoiser(x, t), x[:, :2], d3m_scheduler().alphas_cumprod[t])[:, 1:2]
    assert raw.abs().max() > 1.0  # the input would have left the range without the clamp


def test_amp_on_a_cpu_runs_the_network_in_bf16_and_returns_float32_close_to_full_precision():
    """``amp`` on a CPU: the inferer autocasts the network call in bf16 (MONAI's trainer autocasts on CUDA only),
    the loss sees float32 close to the fp32 result, gradients reach the float32 weights, and the sampler agrees."""
    net = tiny_d3m()
    dtypes = []
    net.denoiser.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    target = torch.rand(4, 2, 16, 16) * 2 - 1
    noise, cond = torch.randn_like(target), torch.randn(4, 3, 16, 16)
    t = torch.tensor([5, 300, 600, 990])
    full = MSSDMInferer(d3m_scheduler(), amp=False)(target, net, noise=noise, timesteps=t, condition=cond)
    half = MSSDMInferer(d3m_scheduler(), amp=True)(target, net, noise=noise, timesteps=t, condition=cond)
    assert dtypes == [torch.float32, torch.bfloat16]
    for key in ("pred", "field"):
        assert half[key].dtype == torch.float32
        scale = full[key].abs().max()
        assert 0 < (half[key] - full[key]).abs().max() < 0.05 * scale, key  # bf16 rounding, not a different result
    WeightedDiffusionLoss()(half, target).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())
    assert net.deformer.unet.final_conv.weight.grad.abs().sum() > 0

    sample_noise, sample_cond = _noise_and_condition()
    samples = [
        MSSDMInferer(d3m_scheduler(), num_inference_steps=4, amp=amp).sample(
            sample_noise, net, conditioning=sample_cond, verbose=False
        )
        for amp in (False, True)
    ]
    assert samples[1].dtype == torch.float32 and len(dtypes) == 2 + 2 * 4
    assert dtypes[2:6] == [torch.float32] * 4 and dtypes[6:] == [torch.bfloat16] * 4
    assert 0 < (samples[1] - samples[0]).abs().max() < 0.1


# --- sampler ------------------------------------------------------------------------------------------------
def _noise_and_condition(seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)


def test_mssdm_with_a_zero_field_equals_plain_ddim():
    net = tiny_d3m()
    torch.nn.init.zeros_(net.deformer.unet.final_conv.weight)  # field exactly 0
    noise, cond = _noise_and_condition()
    inferer = MSSDMInferer(d3m_scheduler(), num_inference_steps=7)
    mssdm = inferer.sample(noise, net, conditioning=cond, verbose=False)
    ddim = ExactDDIMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction")
    ddim.set_timesteps(7)
    plain = DiffusionInferer(ddim).sample(
        noise, net.denoiser, scheduler=ddim, conditioning=cond, mode="concat", verbose=False
    )
    torch.testing.assert_close(mssdm, plain, atol=1e-5, rtol=0)


def test_mssdm_warps_the_clean_estimate_at_every_step():
    """A deformer that always shifts by one pixel: the sampler equals a hand-written DDIM loop that shifts x0."""
    net = tiny_d3m()
    torch.nn.init.zeros_(net.deformer.unet.final_conv.weight)
    with torch.no_grad():
        net.deformer.unet.final_conv.bias.copy_(torch.tensor([1.0, 0.0]))
    noise, cond = _noise_and_condition(6)
    steps = 6
    sampled = MSSDMInferer(d3m_scheduler(), num_inference_steps=steps).sample(
        noise, net, conditioning=cond, verbose=False
    )
    ddim = ExactDDIMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction")
    ddim.set_timesteps(steps)
    ab = lambda s: ddim.alphas_cumprod[s] if s >= 0 else torch.tensor(1.0)
    x = noise
    with torch.no_grad():
        for i, t in enumerate(ddim.timesteps.tolist()):
            prev = ddim.timesteps[i + 1].item() if i + 1 < steps else -1
            v = net.denoiser(torch.cat([x, cond], 1), torch.full((2,), t))
            x0 = (ab(t).sqrt() * x - (1 - ab(t)).sqrt() * v).clamp(-1, 1)
            x0 = torch.cat([x0[:, :, 1:], x0[:, :, -1:]], dim=2)  # x0(i) <- x0(i + 1), border repeated
            eps = (x - ab(t).sqrt() * x0) / (1 - ab(t)).sqrt()
            x = ab(prev).sqrt() * x0 + (1 - ab(prev)).sqrt() * eps
    torch.testing.assert_close(sampled, x, atol=1e-4, rtol=0)
    unshifted = MSSDMInferer(d3m_scheduler(), num_inference_steps=steps, use_mssdm=False).sample(
        noise, net, conditioning=cond, verbose=False
    )
    assert (sampled - unshifted).abs().max() > 1e-2


def test_sampler_rejects_mismatched_schedulers():
    eps_sampler = ExactDDIMScheduler(1000, prediction_type="epsilon")
    with pytest.raises(ValueError, match="training predicts v_prediction"):
        MSSDMInferer(d3m_scheduler(), sample_scheduler=eps_sampler)


def test_paper_network_has_the_authors_parameter_count():
    """The paper-scale network of configs/train.json (dual-stream U-Net + deformation U-Net) has the authors' size:
    55.8 M parameters, counted by instantiating the authors' classes (dim 64, dim_mults (1, 2, 4, 8), channels 5,
    out_dim 1; ../shared/reference/FACTS.md, section 2). Within 5 %."""
    from monai.bundle import ConfigParser

    from brainsynth.engine.bundle_code import bundle_scripts as bundle_context

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_d3m_cemri"
    with bundle_context(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "train.json"))
        network = parser.get_parsed_content("network_def")
    total = sum(p.numel() for p in network.parameters())
    deformer = sum(p.numel() for p in network.deformer.parameters())
    assert abs(total - 55.8e6) / 55.8e6 < 0.05, f"{total / 1e6:.2f} M parameters, the authors' network has 55.8 M"
    assert 0.05e6 < deformer < 0.2e6, f"deformation U-Net {deformer / 1e6:.3f} M, the authors' is about 0.1 M"


# --- deformation schedule and diagnostics -------------------------------------------------------------------
def _shifting(net):
    """The deformer's field is a constant one-pixel shift, whatever its input."""
    torch.nn.init.zeros_(net.deformer.unet.final_conv.weight)
    with torch.no_grad():
        net.deformer.unet.final_conv.bias.copy_(torch.tensor([1.0, 0.0]))
    return net


def test_low_noise_schedule_warps_only_samples_at_or_below_the_limit_in_training():
    net = _shifting(tiny_d3m())
    net.max_timestep = 250
    x, t = torch.randn(2, 5, 16, 16), torch.tensor([250, 251])
    warped, field = net(x, t, alpha_bar=d3m_scheduler().alphas_cumprod[t])
    v = net.denoiser(x, t)
    torch.testing.assert_close(warped[1], v[1])  # t = 251 > 250: identity warp, zero field
    assert field[1].abs().max() == 0 and field[0].abs().max() > 0.5
    torch.testing.assert_close(warped[0], make_warp()(v, field)[0])
    assert (warped[0] - v[0]).abs().max() > 1e-3


def test_low_noise_schedule_in_sampling_skips_the_warp_above_the_limit():
    net = _shifting(tiny_d3m())
    noise, cond = _noise_and_condition(7)
    kwargs = dict(conditioning=cond, verbose=False)
    never = MSSDMInferer(d3m_scheduler(), num_inference_steps=5, mssdm_max_timestep=-1).sample(noise, net, **kwargs)
    off = MSSDMInferer(d3m_scheduler(), num_inference_steps=5, use_mssdm=False).sample(noise, net, **kwargs)
    always = MSSDMInferer(d3m_scheduler(), num_inference_steps=5, mssdm_max_timestep=999).sample(noise, net, **kwargs)
    full = MSSDMInferer(d3m_scheduler(), num_inference_steps=5).sample(noise, net, **kwargs)
    low = MSSDMInferer(d3m_scheduler(), num_inference_steps=5, mssdm_max_timestep=300).sample(noise, net, **kwargs)
    torch.testing.assert_close(never, off)
    torch.testing.assert_close(always, full)
    assert (low - full).abs().max() > 1e-3 and (low - off).abs().max() > 1e-3


def test_diagnostics_of_a_network_that_predicts_zero_velocity():
    """v = 0 makes x0 = sqrt(alpha_bar) x_t, whose sign is the noisy input's: the estimate's Dice must equal the
    no-skill reference exactly; a constant (3, 4)-pixel field has magnitude 5 and zero smoothness penalty."""
    from brainsynth.deformation.diagnostics import mask_estimate_diagnostics

    net = tiny_d3m()
    for p in net.denoiser.parameters():
        torch.nn.init.zeros_(p)
    torch.nn.init.zeros_(net.deformer.unet.final_conv.weight)
    with torch.no_grad():
        net.deformer.unet.final_conv.bias.copy_(torch.tensor([3.0, 4.0]))
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 1, 16, 16)
    mask[:, :, 4:10, 5:12] = 1
    target = torch.cat([torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1, mask * 2 - 1], 1)
    out = mask_estimate_diagnostics(net, d3m_scheduler(), target, torch.randn(4, 3, 16, 16), timesteps=(50, 600))
    for t, e in out.items():
        assert e["mask_dice"] == e["noisy_mask_dice"]
        assert e["field_mean_px"] == pytest.approx(5.0, abs=1e-5) and e["field_smoothness"] == pytest.approx(0.0)
        assert e["field_tumour_mean_px"] == pytest.approx(5.0, abs=1e-5)
    assert out[50]["mask_dice"] > 0.9 and out[600]["mask_dice"] < out[50]["mask_dice"] - 0.2  # noise erodes it

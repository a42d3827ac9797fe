"""Stage 1 of the conditional LDM and the bridge to stage 2: shapes, KL, adversarial warm-up, latent scale factor."""

from __future__ import annotations

import math

import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)
from monai.engines import AdversarialTrainer
from monai.networks.nets import PatchDiscriminator
from monai.networks.schedulers import DDPMScheduler

from brainsynth.engine.io import load_checkpoint, save_checkpoint

bundle_scripts("brain_mri_conditional_ldm")  # the bundle's own code, importable as brain_mri_conditional_ldm_scripts
from brain_mri_conditional_ldm_scripts.latent_autoencoder import (  # noqa: E402
    AutoencoderKLInferer,
    AutoencoderPrepareBatch,
    DiscriminatorAdversarialLoss,
    GeneratorAdversarialLoss,
    LatentAutoencoderKL,
    LatentDiffusionPrepareBatch,
    LatentScaleFactor,
    ReconstructionKLLoss,
    TrainerProgress,
    compute_latent_scale_factor,
    decode_latents,
    kl_divergence,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def tiny_autoencoder(latent_channels: int = 3) -> LatentAutoencoderKL:
    return LatentAutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(4, 8, 8),
        latent_channels=latent_channels,
        num_res_blocks=1,
        attention_levels=(False,) * 3,
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def test_autoencoder_round_trips_shapes_with_4x_downsampling():
    ae = tiny_autoencoder(latent_channels=3)
    x = torch.rand(2, 1, 16, 24, 16)
    recon, mu, sigma = ae(x)
    assert recon.shape == x.shape
    assert mu.shape == sigma.shape == (2, 3, 4, 6, 4)
    assert ae.encode_stage_2_inputs(x).shape == (2, 3, 4, 6, 4)
    assert ae.decode_stage_2_outputs(torch.zeros(2, 3, 4, 6, 4)).shape == x.shape


def test_kl_divergence_matches_closed_form():
    mu, sigma = torch.zeros(2, 3, 2, 2, 2), torch.ones(2, 3, 2, 2, 2)
    assert float(kl_divergence(mu, sigma)) == pytest.approx(0.0, abs=1e-7)
    # per element 0.5 (mu^2 + s^2 - log s^2 - 1) with mu = 1, s = 2: 0.5 (1 + 4 - log 4 - 1); 24 elements per sample
    expected = 24 * 0.5 * (4.0 - math.log(4.0))
    assert float(kl_divergence(mu + 1.0, 2.0 * sigma)) == pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_is_l1_plus_weighted_kl_of_the_same_forward_pass():
    ae = tiny_autoencoder()
    inferer = AutoencoderKLInferer()
    loss_fn = ReconstructionKLLoss(inferer, kl_weight=0.1)
    x = torch.rand(2, 1, 16, 16, 16)
    torch.manual_seed(5)
    recon = inferer(x, ae)
    torch.manual_seed(5)
    _, mu, sigma = ae(x)
    expected = (recon - x).abs().mean() + 0.1 * kl_divergence(mu, sigma)
    assert float(loss_fn(recon, x)) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(RuntimeError, match="AutoencoderKLInferer"):
        ReconstructionKLLoss(AutoencoderKLInferer())(recon, x)


class _Iteration:
    def __init__(self, iteration):
        self.state = type("S", (), {"iteration": iteration})()


def test_adversarial_losses_use_the_patch_logits_and_switch_on_after_warm_up():
    disc = PatchDiscriminator(spatial_dims=3, channels=4, in_channels=1, num_layers_d=2)
    real, fake = disc(torch.rand(2, 1, 16, 16, 16)), disc(torch.rand(2, 1, 16, 16, 16))
    g, d = GeneratorAdversarialLoss(0.5, start_iteration=3), DiscriminatorAdversarialLoss(0.5, start_iteration=3)
    assert float(g(fake)) == 0.0 and float(d(real, fake)) == 0.0  # warm-up: reconstruction only
    handlers = []

    class _Engine:
        def add_event_handler(self, event, fn):
            handlers.append(fn)

    g.attach(_Engine())
    d.attach(_Engine())
    for fn in handlers:
        fn(_Iteration(4))
    # MONAI's least squares (after its leaky-ReLU 0.05 activation) of the last (logit) output only: generator
    # wants 1, discriminator 1 for real and 0 for fake
    act = torch.nn.functional.leaky_relu
    logits_f, logits_r = act(fake[-1], 0.05), act(real[-1], 0.05)
    assert float(g(fake)) == pytest.approx(0.5 * float(((logits_f - 1) ** 2).mean()), rel=1e-5)
    expected_d = 0.5 * 0.5 * (float((logits_f**2).mean()) + float(((logits_r - 1) ** 2).mean()))
    assert float(d(real, fake)) == pytest.approx(expected_d, rel=1e-5)


class _ScaledIdentity(torch.nn.Module):
    """Stand-in autoencoder whose latents are the input times 3 (deterministic)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("latent_scale_factor", torch.tensor(float("nan")))

    def encode_stage_2_inputs(self, x):
        return 3.0 * x

    def decode_stage_2_outputs(self, z):
        return z / 3.0

    def scale_factor(self):
        return float(self.latent_scale_factor)


def test_latent_scale_factor_is_one_over_the_std_of_the_latents_of_the_data():
    batches = [{"image": torch.randn(2, 1, 4, 4, 4) * s + 1.0} for s in (0.5, 2.0, 1.0)]
    stub = _ScaledIdentity()
    z = torch.cat([3.0 * b["image"] for b in batches[:2]])
    # computed from the data actually seen: the first num_batches batches
    assert compute_latent_scale_factor(stub, batches, num_batches=2) == pytest.approx(1.0 / float(z.std()), rel=1e-6)
    # other data, other factor
    assert compute_latent_scale_factor(stub, batches[2:], num_batches=2) != pytest.approx(
        compute_latent_scale_factor(stub, batches, num_batches=2), rel=1e-3
    )
    with pytest.raises(ValueError, match="no batches"):
        compute_latent_scale_factor(stub, [], num_batches=2)


def test_scale_factor_is_stored_with_the_autoencoder_weights(tmp_path):
    ae = tiny_autoencoder()
    assert not ae.has_scale_factor
    with pytest.raises(RuntimeError, match="no latent scale factor"):
        ae.scale_factor()
    batches = [{"image": torch.rand(2, 1, 16, 16, 16)} for _ in range(2)]
    torch.manual_seed(1)
    value = LatentScaleFactor(ae, batches, num_batches=2)()
    assert ae.scale_factor() == pytest.approx(value) and 0.1 < value < 100
    save_checkpoint(ae.state_dict(), tmp_path / "autoencoder.pt")
    fresh = tiny_autoencoder()
    fresh.load_state_dict(load_checkpoint(tmp_path / "autoencoder.pt"))  # weights_only
    assert fresh.scale_factor() == pytest.approx(value)


def test_latent_prepare_batch_trains_on_scaled_latents_and_decoding_undoes_the_scale():
    stub = _ScaledIdentity()
    stub.latent_scale_factor.fill_(0.25)
    prep = LatentDiffusionPrepareBatch(stub, num_train_timesteps=100, condition_name="condition")
    images = torch.rand(2, 1, 4, 4, 4)
    cond = torch.tensor([[0, 1], [2, -1]])
    latents, target, args, kwargs = prep({"image": images, "condition": cond})
    assert torch.allclose(latents, 0.75 * images)  # encode (x3) then scale (x0.25)
    assert kwargs["noise"].shape == latents.shape and torch.equal(target, kwargs["noise"])
    assert torch.equal(kwargs["condition"], cond) and kwargs["timesteps"].shape == (2,)
    assert torch.allclose(decode_latents(stub, latents), images)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_latent_prepare_batch_targets_what_the_training_scheduler_predicts(prediction_type):
    # a network trained on the noise but sampled as a velocity model draws garbage: the target follows the scheduler
    stub = _ScaledIdentity()
    stub.latent_scale_factor.fill_(0.25)
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    prep = LatentDiffusionPrepareBatch(stub, num_train_timesteps=100, condition_name="condition", scheduler=scheduler)
    torch.manual_seed(0)
    latents, target, _, kwargs = prep({"image": torch.rand(3, 1, 4, 4, 4), "condition": torch.zeros(3, 2).long()})
    noise, t = kwargs["noise"], kwargs["timesteps"]
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    expected = {
        "epsilon": noise,
        "v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * latents,
        "sample": latents,
    }[prediction_type]
    assert torch.allclose(target, expected, atol=1e-6)
    if prediction_type == "v_prediction":  # the clean latent comes back from the noisy one and the target
        noisy = scheduler.add_noise(latents, noise, t)
        assert torch.allclose(alpha.sqrt() * noisy - (1 - alpha).sqrt() * target, latents, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type 'x0' is not one of"):
        LatentDiffusionPrepareBatch(stub, 100, scheduler=type("S", (), {"prediction_type": "x0"})())


def test_autoencoder_stage_runs_in_monai_adversarial_trainer_and_resumes_its_counters():
    ae, disc = tiny_autoencoder(), PatchDiscriminator(spatial_dims=3, channels=4, in_channels=1, num_layers_d=2)
    inferer = AutoencoderKLInferer()
    g, d = GeneratorAdversarialLoss(0.1, start_iteration=1), DiscriminatorAdversarialLoss(0.1, start_iteration=1)
    data = [{"image": torch.rand(2, 1, 16, 16, 16)} for _ in range(2)]
    before = [p.detach().clone() for p in ae.parameters()]
    trainer = AdversarialTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        g_network=ae,
        g_optimizer=torch.optim.Adam(ae.parameters(), 1e-3),
        g_loss_function=g,
        recon_loss_function=ReconstructionKLLoss(inferer, 1e-6),
        d_network=disc,
        d_optimizer=torch.optim.Adam(disc.parameters(), 1e-3),
        d_loss_function=d,
        g_inferer=inferer,
        prepare_batch=AutoencoderPrepareBatch(),
        train_handlers=[g, d, LatentScaleFactor(ae, data, 1)],
    )
    trainer.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, ae.parameters()))
    assert ae.has_scale_factor
    progress = TrainerProgress(trainer).state_dict()
    assert progress == {"iteration": 2, "epoch": 1, "epoch_length": 2}
    assert all(isinstance(v, int) for v in progress.values())  # weights-only checkpointable
    other = AdversarialTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        g_network=ae,
        g_optimizer=torch.optim.Adam(ae.parameters()),
        g_loss_function=g,
        recon_loss_function=ReconstructionKLLoss(inferer),
        d_network=disc,
        d_optimizer=torch.optim.Adam(disc.parameters()),
        d_loss_function=d,
    )
    other.state.epoch_length = 2
    TrainerProgress(other).load_state_dict(progress)
    assert (other.state.iteration, other.state.epoch) == (2, 1)

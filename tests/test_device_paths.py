"""What a CPU run cannot see but every GPU user runs (issue 33), shown on a CPU:

- every bundle's every sampler, called twice, on tensors on the ``meta`` device: a stand-in for "not the CPU" that
  raises on any mix of devices and on any read of a value back to the host (so it also shows per-step syncs);
- the dtype the networks run in under each amp setting, with an autocast opened by the caller as MONAI's trainer
  opens one on CUDA;
- scheduler arithmetic in float32 under bf16 autocast (diffusers' solver step, MONAI's DDPM noise, guidance).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)
from monai.bundle import ConfigParser
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

import brainsynth.schedulers.sigmoid  # noqa: F401  (registers "sigmoid_alpha_bar")
from brainsynth.conditioning.categorical import CategoricalConditioning, ConditionalDenoiser, GuidedDenoiser
from brainsynth.deformation.estimation import DeformationUNet
from brainsynth.deformation.mssdm import DeformableDenoiser, MSSDMInferer
from brainsynth.engine.acceleration import Float32Output, autocast
from brainsynth.schedulers.ddim import ExactDDIMScheduler
from brainsynth.schedulers.solvers import DiffusersSolver

REPO = Path(__file__).resolve().parents[1]
META = torch.device("meta")
UNET = dict(channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)

bundle_scripts("brats_mri_d3m_cemri")
bundle_scripts("brain_mri_conditional_ldm")
from brain_mri_conditional_ldm_scripts.latent_autoencoder import LatentAutoencoderKL  # noqa: E402
from brain_mri_conditional_ldm_scripts.latent_sampling import LatentSampler  # noqa: E402
from brats_mri_d3m_cemri_scripts.dual_stream_unet import DualStreamDiffusionUNet  # noqa: E402


def med_ddpm_inferer(sampler: str, amp: bool = False):
    """The Med-DDPM bundle's own ``inferer`` (inference.json) for ``sampler``, on a 6-step schedule."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "brats_mri_med_ddpm" / "configs" / "inference.json"))
    parser.update(
        {"sampler": sampler, "num_train_timesteps": 6, "num_inference_steps": 3, "progress": False, "amp": amp}
    )
    return parser.get_parsed_content("inferer")


MED_DDPM_SAMPLERS = ["ddpm", "ddim", "dpmpp", "unipc"]


# --- every sampler twice on a device that is not the CPU ----------------------------------------------------
@pytest.mark.parametrize("sampler", MED_DDPM_SAMPLERS)
def test_med_ddpm_samplers_run_twice_off_the_cpu(sampler):
    """The second volume is where MONAI's inferer met CUDA timesteps left by the solver (issue 33, finding 1)."""
    inferer = med_ddpm_inferer(sampler)
    network = DiffusionModelUNet(3, in_channels=4 + 5, out_channels=4, **UNET).to(META)
    condition = torch.zeros(1, 5, 8, 8, 8, device=META)
    for _ in range(2):
        image = inferer(condition, network)
        assert image.device == META and image.shape == (1, 4, 8, 8, 8) and image.dtype == torch.float32
    assert inferer.scheduler.timesteps.device.type == "cpu"


def test_d3m_sampler_runs_twice_off_the_cpu():
    torch.manual_seed(0)
    denoiser = DualStreamDiffusionUNet(2, in_channels=5, out_channels=2, num_decoders=2, **UNET)
    network = DeformableDenoiser(denoiser, DeformationUNet(2, features=(4, 4, 8, 8, 8, 4))).to(META)
    inferer = MSSDMInferer(
        DDPMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction"), num_inference_steps=3
    )
    for _ in range(2):
        out = inferer.sample(
            torch.zeros(2, 2, 16, 16, device=META), network, conditioning=torch.zeros(2, 3, 16, 16, device=META)
        )
        assert out.device == META and out.shape == (2, 2, 16, 16)


def test_ldm_sampler_runs_twice_off_the_cpu():
    conditioning = CategoricalConditioning({"pathology": ["healthy", "glioblastoma"], "modality": ["t1w"]}, 8)
    unet = DiffusionModelUNet(
        3, in_channels=3, out_channels=3, with_conditioning=True, cross_attention_dim=8, num_head_channels=8, **UNET
    )
    network = GuidedDenoiser(ConditionalDenoiser(unet, conditioning), 3.0, "per_condition").to(META)
    autoencoder = LatentAutoencoderKL(
        3,
        in_channels=1,
        out_channels=1,
        channels=(4, 4),
        latent_channels=3,
        num_res_blocks=(1, 1),
        norm_num_groups=4,
        attention_levels=(False, False),
    ).to(META)
    autoencoder.latent_scale_factor = torch.tensor(1.0)  # a trained autoencoder's scale (read once per call)
    sampler = LatentSampler(autoencoder, ExactDDIMScheduler(10, schedule="scaled_linear_beta"), 3, verbose=False)
    request = torch.tensor([[1, 0]], device=META)
    for _ in range(2):
        out = sampler(torch.zeros(1, 3, 4, 4, 4, device=META), network, conditioning=request)
        assert out.device == META and out.shape == (1, 1, 8, 8, 8) and out.dtype == torch.float32


def test_conditioning_reads_nothing_back_to_the_host_off_the_cpu():
    """Training-time condition dropout and the index check of every forward stay on the device (torch.compile
    would break its graph there, and a GPU would wait for each read)."""
    conditioning = CategoricalConditioning({"pathology": ["a", "b"], "modality": ["x"]}, 8, 0.5, 0.1)
    # on the CPU the check names the bad index; off it the same condition is an asynchronous assertion
    with pytest.raises(ValueError, match="pathology index 5 out of range"):
        conditioning.tokens(torch.tensor([[5, 0]]))
    conditioning.to(META)
    tokens = conditioning(torch.zeros(4, 2, dtype=torch.long, device=META))  # training mode: dropout
    assert tokens.shape == (4, 2, 8) and tokens.device == META


# --- dtypes under each amp setting --------------------------------------------------------------------------
@pytest.mark.parametrize("outer", [False, True], ids=["no caller autocast", "caller autocast"])
@pytest.mark.parametrize("amp", [False, True], ids=["amp off", "amp on"])
def test_d3m_training_network_runs_in_the_autocast_it_is_given(amp, outer):
    """MONAI's trainer opens an autocast around the training step (on CUDA, fp16 with a GradScaler); the D3M
    inferer must not switch it off (issue 33, finding 2: the network ran fp32 under an active scaler). A CPU
    autocast opened by the test stands in for the trainer's: the inferer's code path is the same."""
    torch.manual_seed(0)
    denoiser = DualStreamDiffusionUNet(2, in_channels=5, out_channels=2, num_decoders=2, **UNET)
    network = DeformableDenoiser(denoiser, DeformationUNet(2, features=(4, 4, 8, 8, 8, 4)))
    seen = []
    denoiser.conv_in.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    network.deformer.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    inferer = MSSDMInferer(DDPMScheduler(1000, schedule="sigmoid_alpha_bar", prediction_type="v_prediction"), amp=amp)
    target = torch.zeros(2, 2, 16, 16)
    caller = torch.autocast("cpu", dtype=torch.bfloat16) if outer else autocast("cpu", False)
    with caller:
        out = inferer(
            target,
            network,
            noise=torch.randn_like(target),
            timesteps=torch.tensor([3, 500]),
            condition=torch.zeros(2, 3, 16, 16),
        )
    expected = torch.bfloat16 if (amp or outer) else torch.float32
    assert seen == [expected, expected]  # the U-Net and the deformer
    assert out["pred"].dtype == torch.float32 and out["field"].dtype == torch.float32


def test_a_disabled_autocast_leaves_the_callers_autocast_on():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast("cpu", False):
            assert torch.is_autocast_enabled("cpu")
            assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


# --- float32 scheduler arithmetic under bf16 autocast -------------------------------------------------------
@pytest.mark.parametrize("solver", ["dpmsolver++", "unipc"])
def test_solver_steps_in_float32_whatever_the_network_output(solver):
    """diffusers casts each step's result to the model output's dtype; the adapter hands it float32."""
    gen = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 1, 8, 8, generator=gen), torch.randn(1, 1, 8, 8, generator=gen)
    half = output.bfloat16()
    results = []
    for model_output in (half, half.float()):
        scheduler = DiffusersSolver(solver, num_train_timesteps=50)
        scheduler.set_timesteps(5)
        x = sample
        for t in scheduler.timesteps:
            x, _ = scheduler.step(model_output, t, x)
        results.append(x)
    assert results[0].dtype == torch.float32
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("sampler", MED_DDPM_SAMPLERS)
def test_med_ddpm_scheduler_sees_float32_while_the_network_runs_bf16(sampler):
    """Under amp the network runs bf16; the scheduler receives float32 (MONAI's DDPMScheduler draws its noise in the
    model output's dtype, so bf16 outputs meant bf16 noise)."""
    inferer = med_ddpm_inferer(sampler, amp=True)
    network = DiffusionModelUNet(3, in_channels=4 + 5, out_channels=4, **UNET)
    seen_network, seen_step = [], []
    network.conv_in.register_forward_hook(lambda m, a, out: seen_network.append(out.dtype))
    step = inferer.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen_step.append((model_output.dtype, sample.dtype))
        return step(model_output, timestep, sample, *args, **kwargs)

    inferer.scheduler.step = recording_step
    inferer(torch.zeros(1, 5, 8, 8, 8), network)
    assert seen_network and set(seen_network) == {torch.bfloat16}
    assert set(seen_step) == {(torch.float32, torch.float32)}


def test_guidance_combines_bf16_branches_in_float32():
    conditioning = CategoricalConditioning({"pathology": ["a", "b"], "modality": ["x", "y"]}, 8).eval()
    unet = DiffusionModelUNet(
        2, in_channels=1, out_channels=1, with_conditioning=True, cross_attention_dim=8, num_head_channels=8, **UNET
    )
    torch.nn.init.normal_(unet.out[-1].conv.weight, std=0.1)
    denoiser = ConditionalDenoiser(unet, conditioning).eval()
    guided = GuidedDenoiser(denoiser, {"pathology": 3.0, "modality": 2.0}, "per_condition")
    x, t, request = torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.tensor([[1, 0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        combined = guided(x, t, request)
        null = denoiser(x, t, torch.tensor([[-1, -1]]))
        branches = [denoiser(x, t, torch.tensor([[1, -1]])), denoiser(x, t, torch.tensor([[-1, 0]]))]
    assert combined.dtype == torch.float32 and null.dtype == torch.bfloat16
    expected = null.float() + 3.0 * (branches[0].float() - null.float()) + 2.0 * (branches[1].float() - null.float())
    torch.testing.assert_close(combined, expected, rtol=0, atol=0)


def test_float32_output_runs_the_network_in_mixed_precision_and_returns_float32():
    linear = torch.nn.Linear(4, 4)
    wrapped = Float32Output(linear, "cpu", amp=True)
    assert wrapped(torch.ones(1, 4)).dtype == torch.float32
    assert torch.allclose(wrapped(torch.ones(1, 4)), linear(torch.ones(1, 4)).bfloat16().float(), atol=0.05)


# --- training state on a GPU: determinism setting, loss scaler, random states, host memory under DDP ---------
def test_deterministic_defaults_to_exact_on_a_cpu_and_fast_with_cuda(monkeypatch):
    from brainsynth.engine import training

    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, warn_only=False: calls.append(mode))
    for flag in ("deterministic", "benchmark"):
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))  # restored after
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    training.seed_everything(0)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what initialize sees on a GPU machine
    training.seed_everything(0)
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark and calls == [False]
    training.seed_everything(0, deterministic=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark and calls == [False, True]
    assert torch.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.parametrize(
    "config",
    [
        "brats_mri_med_ddpm/configs/train.json",
        "brats_mri_d3m_cemri/configs/train.json",
        "brain_mri_conditional_ldm/configs/train_autoencoder.json",
    ],
)
def test_every_bundle_seeds_with_its_deterministic_setting(config, monkeypatch):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / config))
    assert parser.get_parsed_content("deterministic") is (not torch.cuda.is_available())
    assert any("seed_everything(@seed, @deterministic)" in str(line) for line in parser["initialize"])


def test_loss_scaler_state_travels_in_the_checkpoint(tmp_path):
    """A resumed fp16 run continues with the scale it had reached (MONAI's trainers: ``scaler``; the adversarial
    trainer: ``state.g_scaler`` / ``state.d_scaler``); a GradScaler on the CPU stands in for CUDA's."""
    from ignite.engine import Engine

    from brainsynth.engine.training import ResumableCheckpoint

    def engine_with_scalers(scale=None):
        engine = Engine(lambda e, b: None)
        engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        engine.state.g_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        if scale is not None:
            for scaler in (engine.scaler, engine.state.g_scaler):
                scaler.scale(torch.ones(1))  # the scale exists from the first scaled loss on
                scaler.update(new_scale=scale)
        return engine

    first = engine_with_scalers(scale=8.0)
    ResumableCheckpoint(tmp_path, {"trainer": first}).attach(first)
    first.run(range(1), max_epochs=1)
    resumed = engine_with_scalers()
    ResumableCheckpoint(tmp_path, {"trainer": resumed}).attach(resumed)
    resumed.run(range(1), max_epochs=2)
    assert resumed.scaler.get_scale() == 8.0 and resumed.state.g_scaler.get_scale() == 8.0


def test_resume_with_fewer_visible_gpus_restores_the_devices_both_have(monkeypatch, caplog):
    """A job saved on two GPUs and resumed on one: torch.cuda.set_rng_state_all would address a device that is not
    there (simulated: the state list of two devices, one visible device that refuses any other index)."""
    from brainsynth.engine import training

    state = training.get_rng_state()
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored = []

    def set_device_state(new_state, device=0):
        if int(device) >= 1:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored.append((int(new_state[0]), int(device)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_device_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_device_state)
    training.set_rng_state({**state, "cuda": saved})
    assert restored == [(1, 0)]
    assert "saved with 2 visible GPU(s), this run has 1" in caplog.text


def test_d3m_ranks_cache_disjoint_shares_of_the_training_volumes(monkeypatch):
    """Under DDP each D3M rank caches its own share (issue 33, finding 6: every rank cached every volume)."""
    import torch.distributed as dist

    shares = []
    for rank in range(2):
        parser = ConfigParser()
        configs = REPO / "bundles" / "brats_mri_d3m_cemri" / "configs"
        parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
        parser["train#items"] = [{"image": f"subject{i}"} for i in range(7)]
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        shares.append([row["image"] for row in parser.get_parsed_content("train#dataset#data")])
    assert len(shares[0]) == len(shares[1]) == 4  # 7 volumes, padded to 2 x 4
    assert set(shares[0]) | set(shares[1]) == {f"subject{i}" for i in range(7)}
    assert len(set(shares[0]) & set(shares[1])) == 1  # the one padding repeat


# --- torch.compile ------------------------------------------------------------------------------------------
def test_compiled_network_takes_metatensors_as_plain_tensors():
    """MONAI's transforms hand the network MetaTensors (Med-DDPM's masks); the compiled code sees plain tensors."""
    from monai.data import MetaTensor

    from brainsynth.engine.acceleration import compile_network

    torch._dynamo.reset()
    seen = []
    network = torch.nn.Conv3d(2, 2, 1)
    compiled = compile_network(network, backend="eager")
    compiled.register_forward_pre_hook(lambda m, args: seen.append(type(args[0])))  # runs after the stripping hook
    out = compiled(MetaTensor(torch.ones(1, 2, 2, 2, 2), affine=torch.eye(4) * 2))
    assert seen == [torch.Tensor] and type(out) is torch.Tensor
    torch.testing.assert_close(out, network(torch.ones(1, 2, 2, 2, 2)))


def test_ddp_wrapper_is_compiled_last(tmp_path):
    import torch.distributed as dist

    from brainsynth.engine.acceleration import distributed
    from brainsynth.engine.training import unwrap

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        network = torch.nn.Linear(3, 3)
        settings = {"activation_checkpointing": False, "channels_last": False}
        plain = distributed(network, {**settings, "compile": False})
        compiled = distributed(network, {**settings, "compile": True})
        assert isinstance(plain, torch.nn.parallel.DistributedDataParallel)
        assert isinstance(compiled._orig_mod, torch.nn.parallel.DistributedDataParallel)
        assert unwrap(compiled) is network and unwrap(plain) is network
    finally:
        dist.destroy_process_group()


def test_guidance_off_the_cpu_runs_every_branch_with_the_same_result(monkeypatch):
    """Off the CPU (and under compile) per-condition guidance does not read the request back to choose branches: it
    runs every condition's branch, and a condition the request leaves null adds eps(0) - eps(0) = 0."""
    torch.manual_seed(0)
    conditioning = CategoricalConditioning({"pathology": ["a", "b"], "modality": ["x", "y"]}, 8).eval()
    unet = DiffusionModelUNet(
        2, in_channels=1, out_channels=1, with_conditioning=True, cross_attention_dim=8, num_head_channels=8, **UNET
    )
    torch.nn.init.normal_(unet.out[-1].conv.weight, std=0.1)
    guided = GuidedDenoiser(ConditionalDenoiser(unet, conditioning).eval(), 3.0, "per_condition")
    x, t, request = torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([[1, -1], [0, -1]])
    calls = []
    unet.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    with torch.no_grad():
        chosen = guided(x, t, request)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the path a GPU / compiled graph takes
        every = guided(x, t, request)
    assert calls == [2 * 2, 3 * 2]  # null + pathology branch; then null + both condition branches
    torch.testing.assert_close(every, chosen, rtol=0, atol=1e-6)

"""Acceleration switches change speed and memory, never the numbers or the checkpoint format."""

import copy

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from brainsynth.engine.acceleration import accelerate


def _unet():
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=1,
        channels=(8, 16),
        num_res_blocks=1,
        attention_levels=(False, True),
        norm_num_groups=8,
        num_head_channels=8,
    )


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
    ae = AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        latent_channels=2,
        num_res_blocks=(1, 1),
        norm_num_groups=4,
        attention_levels=(False, False),
    )
    accelerate(ae, activation_checkpointing=True)
    assert any(type(m).__name__ == "CheckpointWrapper" for m in ae.modules())


def test_nothing_to_checkpoint_is_an_error():
    with pytest.raises(ValueError, match="no checkpointable block"):
        accelerate(torch.nn.Linear(2, 2), activation_checkpointing=True)


def _attention_unet(use_flash_attention=False):
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=1,
        channels=(8, 16),
        num_res_blocks=1,
        attention_levels=(False, True),
        norm_num_groups=8,
        num_head_channels=8,
        use_flash_attention=use_flash_attention,
    )


@pytest.mark.parametrize("switch", ["use_flash_attention", "channels_last", "activation_checkpointing"])
def test_each_switch_gives_the_plain_forward_output(switch):
    torch.manual_seed(0)
    plain = _attention_unet().eval()
    if switch == "use_flash_attention":
        fast = _attention_unet(use_flash_attention=True)
        fast.load_state_dict(plain.state_dict())  # same parameters, fused attention kernel
    else:
        fast = accelerate(copy.deepcopy(plain), **{switch: True})
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x, timesteps=t), plain(x, timesteps=t), atol=1e-5, rtol=1e-4)


def test_compiled_network_keeps_plain_checkpoint_keys(tmp_path):
    """torch.compile wraps the module as ``_orig_mod``: state dicts in and out must still use the plain keys, so
    MONAI's CheckpointLoader, the EMA and ResumableCheckpoint read and write interchangeable checkpoints."""
    from brainsynth.engine.io import load_checkpoint
    from brainsynth.engine.training import EMAHandler, ResumableCheckpoint

    torch.manual_seed(0)
    plain = _unet()
    compiled = accelerate(_unet(), compile=True, activation_checkpointing=True)  # compiling is lazy: no forward
    assert type(compiled).__name__ == "OptimizedModule"
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())  # strict: a plain checkpoint loads into the compiled network
    for name, value in compiled.state_dict().items():
        assert torch.equal(value, plain.state_dict()[name])

    ema = EMAHandler(compiled, decay=0.5, update_every=1, start_step=0)
    assert type(ema.ema_network).__name__ == "DiffusionModelUNet"  # a plain copy, not a second compiled wrapper
    with torch.no_grad():
        for p in compiled.parameters():
            p.add_(1.0)
    ema.update(1)
    first = next(iter(plain.state_dict()))
    torch.testing.assert_close(ema.state_dict()[first], plain.state_dict()[first] + 0.5)

    class _Trainer:  # the one attribute ResumableCheckpoint.save needs
        def state_dict(self):
            return {}

    saver = ResumableCheckpoint(
        tmp_path,
        {"network": compiled, "ema": ema, "trainer": _Trainer()},
        final_model_path=tmp_path / "model.pt",
        final_from="ema",
    )
    saver.finish(None)
    _unet().load_state_dict(load_checkpoint(tmp_path / "model.pt"))  # strict
    _unet().load_state_dict(load_checkpoint(tmp_path / "checkpoint_last.pt")["network"])


@pytest.mark.slow
def test_compiled_forward_matches_plain():
    """Compiling takes about a minute on a CPU core, hence opt-in."""
    torch.manual_seed(0)
    plain = _attention_unet().eval()
    compiled = accelerate(copy.deepcopy(plain), compile=True)
    x, t = torch.randn(1, 2, 8, 8, 8), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, timesteps=t), plain(x, timesteps=t), atol=1e-4, rtol=1e-3)


def test_samplers_honour_amp():
    """``amp`` runs the sampler's network calls under bf16 autocast, and the sample comes back in float32."""
    from brainsynth.conditioning.semantic_mask import MaskConditionedSampler
    from brainsynth.schedulers.ddim import ExactDDIMScheduler

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, timesteps, **kwargs):
            seen.append(torch.is_autocast_enabled(x.device.type))
            return torch.nn.functional.linear(x[:, :1].movedim(1, -1), torch.ones(1, 1)).movedim(-1, 1)

    condition = torch.ones(1, 1, 4, 4, 4)
    for amp in (False, True):
        seen.clear()
        sampler = MaskConditionedSampler(
            ExactDDIMScheduler(num_train_timesteps=10, schedule="cosine"),
            out_channels=1,
            num_inference_steps=2,
            progress=False,
            seed=0,
            amp=amp,
        )
        out = sampler(condition, Probe())
        assert seen == [amp, amp] and out.dtype == torch.float32


def test_bundle_trained_with_switches_on_loads_into_the_plain_network(tmp_path):
    """Med-DDPM trained through ``monai.bundle run`` with fused attention, channels-last and activation
    checkpointing on writes checkpoints that the plain network (all switches off) loads strictly."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from monai.bundle import ConfigParser

    from brainsynth.data import resolve_dataset_dir
    from brainsynth.engine.io import load_checkpoint

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_med_ddpm"
    cohort = {"n_subjects": 4, "spacing": 10.0, "seed": 0, "pathologies": ["glioblastoma"]}
    resolve_dataset_dir("demo", tmp_path / "cache", **cohort)
    tiny = {
        "dataset_dir": "demo",
        "demo_cohort": cohort,
        "cache_dir": str(tmp_path / "cache"),
        "bundle_root": str(tmp_path / "run"),
        "spatial_size": [24, 24, 16],
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_res_blocks": 1,
        "norm_num_groups": 8,
        "batch_size": 2,
        "epoch_length": 2,
        "max_epochs": 1,
        "num_workers": 0,
        "cache_rate": 0.0,
        "ema_start_step": 0,
        "ema_update_every": 1,
        "preview_every": 0,
    }
    overlay = tmp_path / "tiny.json"
    overlay.write_text(json.dumps(tiny))
    configs = [str(bundle / "configs" / "train.json"), str(overlay)]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ci"))
    import verify_bundles as vb

    reports = tmp_path / "probe"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(configs),
        "--use_flash_attention",
        "true",
        "--channels_last",
        "true",
        "--activation_checkpointing",
        "true",
    ]
    proc = subprocess.run(
        cmd,
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=600,
        env={**vb.probe_environment(reports, None), "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the run itself trained the accelerated network: the engine probe saw what the trainer held
    trainers = [e for r in vb.read_probe_reports(reports) for e in r["engines"] if e["trains"]]
    assert trainers and trainers[-1]["iterations"] == 2
    built = trainers[-1]["network"]
    assert built["checkpoint_wrappers"] > 0, built
    assert built["flash_attention_blocks"] > 0, built
    assert built["channels_last_3d"] is True, built

    from brainsynth.engine.bundle_code import bundle_scripts

    parser = ConfigParser()
    parser.read_config(configs)
    with bundle_scripts(bundle):  # network_def is the bundle's own class (scripts.network)
        plain = parser.get_parsed_content("network_def")  # every switch at its default (off)
    assert not any(type(m).__name__ == "CheckpointWrapper" for m in plain.modules())
    ema = load_checkpoint(tmp_path / "run" / "models" / "model.pt")
    plain.load_state_dict(ema)  # strict
    last = load_checkpoint(tmp_path / "run" / "runs" / "train" / "checkpoint_last.pt")
    assert list(last["network"]) == list(ema) and last["trainer"]["iteration"] == 2


def test_cpu_bf16_units_are_read_from_the_kernel_flags(tmp_path):
    from brainsynth.engine.acceleration import cpu_has_bf16_units

    def cpuinfo(flags):
        path = tmp_path / f"cpuinfo_{len(flags)}"
        path.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {' '.join(flags)}\n\nprocessor\t: 1\n")
        return str(path)

    assert cpu_has_bf16_units(cpuinfo(["fpu", "avx2", "avx512f", "avx512_bf16"]))
    assert cpu_has_bf16_units(cpuinfo(["fpu", "amx_tile", "amx_bf16"]))
    # AVX-512 without bf16 arithmetic has no bf16 units; a name that only contains the flag is not it
    assert not cpu_has_bf16_units(cpuinfo(["fpu", "avx2", "avx512f", "avx512bw", "avx512_bf16x"]))
    assert not cpu_has_bf16_units(str(tmp_path / "missing"))


def test_d3m_demo_autocasts_in_its_inferer_on_a_cpu_and_leaves_monai_amp_to_cuda():
    """The D3M demo's ``amp``: on a CPU with bf16 units the training inferer autocasts (MONAI's trainer would only
    autocast on CUDA and warn), elsewhere fp32; the trainer's own amp stays off without CUDA."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    import brainsynth.deformation.mssdm  # noqa: F401  (the config's _target_ modules)
    import brainsynth.schedulers.sigmoid  # noqa: F401
    from brainsynth.engine.acceleration import cpu_has_bf16_units

    configs = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_d3m_cemri" / "configs"
    parser = ConfigParser(globals={"brainsynth": brainsynth, "torch": torch})
    parser.read_config([str(configs / "train.json"), str(configs / "demo.json")])
    expected = torch.cuda.is_available() or cpu_has_bf16_units()
    assert parser.get_parsed_content("train#inferer").amp == expected
    assert parser.get_parsed_content("train#trainer#amp") == torch.cuda.is_available()
    parser["amp"] = True  # the same wiring on any CPU, whatever its flags
    assert parser.get_parsed_content("train#inferer", lazy=False).amp is True
    assert parser.get_parsed_content("train#trainer#amp", lazy=False) == torch.cuda.is_available()

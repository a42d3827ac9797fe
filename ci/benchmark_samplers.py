"""Per-bundle adapters for ci/benchmark.py: the training stages to time, and each bundle's own sampler built from
its inference config.

A sampling adapter ``(parser, spec) -> Sampling`` builds the bundle's sampler; ``Sampling.run_once()`` samples once
and returns how many units (volumes, slices) it produced. Step specs are "NAME:STEPS" strings:

- Med-DDPM: ``ddpm:250`` (the authors' ancestral sampler, always all 250 steps), ``ddim:N`` (deterministic DDIM,
  brainsynth.schedulers.ddim.ExactDDIMScheduler), ``ancestral_ddim:N`` (the same with eta = 1: ancestral, respaced),
  ``pndm:N`` (MONAI's PNDM, a higher-order multistep sampler), ``dpmpp:N`` / ``unipc:N`` (diffusers'
  DPM-Solver++(2M) and UniPC via brainsynth.schedulers.solvers).
- D3M: ``slice:N`` (one batch of ``batch_size`` 2D slices, N DDIM + MSSDM steps; figure per slice) and
  ``volume:N`` (a whole volume through the bundle's batched SliceSynthesisInferer: 155 slices of 240 x 240 at paper
  size, the demo cohort's slices at demo size; figure per volume).
- Conditional LDM: ``ddim:N`` (classifier-free-guided DDIM in latent space, then decoding; figure per volume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Sampling:
    run_once: Callable[[], int]
    unit: str
    device: torch.device
    network_evaluations: int  # network calls per unit of output (one batched call counts once)


def _spec(spec: str) -> tuple[str, int]:
    name, _, steps = str(spec).partition(":")
    if not steps.isdigit():
        raise ValueError(f"sampling spec {spec!r}: expected NAME:STEPS, e.g. ddim:50")
    return name, int(steps)


def _no_scale_factor_needed(parser) -> None:
    """Random autoencoder weights have no latent scale factor yet; speed does not depend on it."""
    from brainsynth.engine.training import unwrap

    ae = unwrap(parser.get_parsed_content("autoencoder"))
    ae.latent_scale_factor.fill_(1.0)
    ae.requires_grad_(False)


# --- training stages: (stage name, config files in merge order, setup(parser) before timing) -----------------
#: the conditional LDM's two stages keep their own batch sizes (its demo overlay sets both, and its inference
#: batch_size); the harness's ``batch_size`` override means the running stage's
STAGE_KEYS = {
    ("brain_mri_conditional_ldm", "autoencoder"): {"batch_size": "ae_batch_size"},
    ("brain_mri_conditional_ldm", "diffusion"): {"batch_size": "diffusion_batch_size"},
}


def stage_overrides(bundle: str, stage: str, overrides: dict) -> dict:
    """``overrides`` in the stage's own key names."""
    names = STAGE_KEYS.get((bundle, stage), {})
    return {names.get(k, k): v for k, v in overrides.items()}


TRAIN_STAGES = {
    "brats_mri_med_ddpm": [("diffusion", ["train.json"], None)],
    "brats_mri_d3m_cemri": [("diffusion", ["train.json"], None)],
    "brain_mri_conditional_ldm": [
        ("autoencoder", ["train_autoencoder.json"], None),
        ("diffusion", ["train_autoencoder.json", "train_diffusion.json"], _no_scale_factor_needed),
    ],
}


# --- sampling -------------------------------------------------------------------------------------------------
def spec_overrides(bundle: str, spec: str) -> dict:
    """The config overrides that select sampler spec ``NAME:STEPS`` in a bundle's inference config (one place, used
    by the speed adapters below and by ci/sampler_quality.py)."""
    name, steps = _spec(spec)
    if bundle == "brats_mri_med_ddpm":
        if name == "pndm":
            return {
                "sampler": "ddim",
                "num_inference_steps": steps,
                "fast_scheduler": {
                    "_target_": "monai.networks.schedulers.PNDMScheduler",
                    "num_train_timesteps": "@num_train_timesteps",
                    "schedule": "cosine_float64",  # the bundle's training schedule (Med-DDPM's float64 cosine)
                    "skip_prk_steps": True,
                    "prediction_type": "@prediction_type",  # MONAI's PNDM has no x0 clipping (the others clip)
                },
            }
        if name in ("ddpm", "ddim"):
            return {"sampler": name, "num_inference_steps": steps, "ddim_eta": 0.0}
        if name in ("dpmpp", "unipc"):  # diffusers' DPM-Solver++(2M) / UniPC (the bundle's solver_scheduler)
            return {"sampler": name, "num_inference_steps": steps}
        if name == "ancestral_ddim":  # eta = 1: ancestral sampling respaced to STEPS
            return {"sampler": "ddim", "num_inference_steps": steps, "ddim_eta": 1.0}
        raise ValueError(f"Med-DDPM sampler {name!r}: ddpm, ddim, ancestral_ddim, pndm, dpmpp or unipc")
    if bundle == "brats_mri_d3m_cemri":
        if name not in ("ddim", "slice", "volume"):
            raise ValueError(f"D3M spec {spec!r}: ddim:STEPS, slice:STEPS or volume:STEPS")
        return {"num_inference_steps": steps}
    if bundle == "brain_mri_conditional_ldm":
        if name != "ddim":
            raise ValueError(f"conditional LDM sampler {name!r}: ddim")
        return {"num_inference_steps": steps}
    raise ValueError(f"unknown bundle {bundle!r}")


def _apply(parser, bundle: str, spec: str) -> None:
    for key, value in spec_overrides(bundle, spec).items():
        parser[key] = value


def med_ddpm(parser, spec, size: str = "demo") -> Sampling:
    _apply(parser, "brats_mri_med_ddpm", spec)
    parser["progress"] = False
    device = torch.device(parser.get_parsed_content("device"))
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    classes, size = parser.get_parsed_content("classes"), parser.get_parsed_content("spatial_size")
    condition = torch.zeros(1, len(classes), *size, device=device)
    condition[:, classes.index("brain") if "brain" in classes else -1] = 1.0  # an all-brain mask: speed only
    evaluations = len(inferer.scheduler.timesteps)

    def run_once():
        with torch.no_grad():
            inferer(condition, network)
        return 1

    return Sampling(run_once, "volume", device, evaluations)


def d3m(parser, spec, size: str = "demo") -> Sampling:
    _apply(parser, "brats_mri_d3m_cemri", spec)
    what, steps = _spec(spec)
    device = torch.device(parser.get_parsed_content("device"))
    network = parser.get_parsed_content("network").eval()
    channels = len(parser.get_parsed_content("condition_modalities"))
    targets = len(parser.get_parsed_content("target_keys"))
    size = parser.get_parsed_content("spatial_size")
    batch = int(parser.get_parsed_content("batch_size"))
    gen = torch.Generator().manual_seed(0)
    if what == "slice":
        sampler = parser.get_parsed_content("sampler")
        condition = torch.rand(batch, channels, *size, generator=gen).mul(2).sub(1).to(device)
        noise = torch.randn(batch, targets, *size, generator=gen).to(device)

        def run_once():
            with torch.no_grad():
                sampler.sample(noise, network, conditioning=condition, verbose=False)
            return batch

        return Sampling(run_once, "slice", device, steps)
    if what == "volume":
        parser["inferer#progress"] = False
        inferer = parser.get_parsed_content("inferer")
        cohort = parser.get_parsed_content("demo_cohort") or {}
        # paper size: a whole BraTS volume (155 slices), whatever cohort fed the configs; demo: the demo cohort's
        shape = cohort.get("shape") if size == "demo" and cohort.get("shape") else (240, 240, 155)
        # no background: every slice is synthesised (the inferer skips empty ones; real volumes have a few)
        volume = torch.rand(1, channels, *shape, generator=gen).mul(2).sub(1).to(device)
        n_batches = -(-int(shape[-1]) // batch)

        def run_once():
            inferer(volume, network)
            return 1

        return Sampling(run_once, f"volume ({shape[-1]} slices)", device, steps * n_batches)
    raise ValueError(f"D3M speed spec {spec!r}: slice:STEPS or volume:STEPS")


def conditional_ldm(parser, spec, size: str = "demo") -> Sampling:
    _apply(parser, "brain_mri_conditional_ldm", spec)
    steps = _spec(spec)[1]
    parser["progress"] = False
    device = torch.device(parser.get_parsed_content("device"))
    _no_scale_factor_needed(parser)
    network = parser.get_parsed_content("guided_network").eval()
    inferer = parser.get_parsed_content("inferer")
    shape = parser.get_parsed_content("latent_shape")
    request = parser.get_parsed_content("requests")[0]
    condition = torch.as_tensor(request["condition"]).long().reshape(1, -1).to(device)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    def run_once():
        with torch.no_grad():
            inferer(noise, network, conditioning=condition)
        return 1

    return Sampling(run_once, "volume", device, steps)


SAMPLERS = {"brats_mri_med_ddpm": med_ddpm, "brats_mri_d3m_cemri": d3m, "brain_mri_conditional_ldm": conditional_ldm}
DEFAULT_SAMPLE_STEPS = {
    "brats_mri_med_ddpm": ["ddpm:250", "ddim:50", "ddim:25", "ddim:10"],
    "brats_mri_d3m_cemri": ["slice:250", "slice:50", "volume:250", "volume:50"],
    "brain_mri_conditional_ldm": ["ddim:50"],
}

"""Tests that fail when the science breaks, not only the plumbing.

* Training learns: each bundle's own trainer (built from its train configs at the tiny size, handlers off), fed
  one fixed batch with the same noise and timesteps at every iteration, drives its loss well below where it started.
  With a learning rate of 0 the loss stays put and these tests fail.
* Conditions change outputs: on toy tasks where the condition alone determines the answer, a tiny model trained
  with the bundle's trainer (Med-DDPM, D3M) or its conditional latent denoiser (LDM) generates what the condition
  asks for; guidance above 1 separates the LDM's conditions more than guidance 1. Zero the condition during
  training and these tests fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from tiny_bundles import BUNDLES, TINY

from brainsynth.engine.bundle_code import bundle_scripts


def _parser(bundle: str, configs: list[str], root: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in [*configs, "demo.json"]])
    parser.update({**TINY[bundle]["overlay"], "cache_dir": str(root / "cache"), "bundle_root": str(root)})
    parser.update(overrides)
    for key in ("train#handlers", "train#referenced_handlers"):  # no checkpoints, logs or previews
        parser[key] = []
    return parser


def _fixed_batch_losses(trainer, batch, steps: int, loss_key: str = "loss") -> list[float]:
    """Run ``trainer`` on ``batch`` ``steps`` times, reseeding before each iteration so that every iteration sees the
    same noise and timesteps: an optimisation problem with one answer. Returns the loss of each iteration."""
    from ignite.engine import Events

    losses = []
    trainer.data_loader = [batch] * steps
    trainer.state.max_epochs, trainer.state.epoch_length = 1, steps
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: torch.manual_seed(1234))

    def record(engine):
        output = engine.state.output  # decollated (a list of per-item dicts) or not
        losses.append(float((output[0] if isinstance(output, list) else output)[loss_key]))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    return losses


def _first(loader):
    return next(iter(loader))


def _assert_learns(losses: list[float], fraction: float, what: str) -> None:
    start, end = losses[0], min(losses[-3:])
    assert end < fraction * start, (
        f"{what}: the loss on one fixed batch went from {start:.4f} to {end:.4f} in {len(losses)} iterations "
        f"(ratio {end / start:.2f}, expected below {fraction}): training is not learning"
    )


# --- training learns -------------------------------------------------------------------------------------------
#: the demo overlay's rate is tuned for a 1,000-step demo; 40 steps on one batch use a larger one
LEARNING_RATE = {"brats_mri_med_ddpm": {"learning_rate": 0.003}}


@pytest.mark.parametrize(
    "bundle,configs,steps,fraction,loss_key",
    [
        ("brats_mri_med_ddpm", ["train.json"], 40, 0.5, "loss"),
        ("brats_mri_d3m_cemri", ["train.json"], 40, 0.5, "loss"),
        ("brain_mri_conditional_ldm", ["train_autoencoder.json"], 40, 0.5, "reconstruction_loss"),
        ("brain_mri_conditional_ldm", ["train_autoencoder.json", "train_diffusion.json"], 40, 0.5, "loss"),
    ],
    ids=["med_ddpm", "d3m", "ldm_autoencoder", "ldm_diffusion"],
)
def test_each_stage_overfits_one_fixed_batch(bundle, configs, steps, fraction, loss_key, tmp_path):
    with bundle_scripts(BUNDLES / bundle):
        parser = _parser(bundle, configs, tmp_path, adversarial_start_iteration=10_000, **LEARNING_RATE.get(bundle, {}))
        torch.manual_seed(0)
        batch = _first(parser.get_parsed_content("train#dataloader"))
        trainer = parser.get_parsed_content("train#trainer")
        if "diffusion" in configs[-1]:  # stage 2 on a fresh autoencoder: stage 1 would have stored the scale
            parser.get_parsed_content("autoencoder").latent_scale_factor.fill_(1.0)
        losses = _fixed_batch_losses(trainer, batch, steps, loss_key)
    _assert_learns(losses, fraction, f"{bundle} {configs[-1]}")


# --- conditions change outputs ---------------------------------------------------------------------------------
def _train_on(trainer, batches, steps):
    trainer.data_loader = [batches[i % len(batches)] for i in range(steps)]
    trainer.state.max_epochs, trainer.state.epoch_length = 1, steps
    trainer.run()


def _crop_around_tumour(condition: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Each item's ``size`` crop centred on its tumour (channels 0-2), kept inside the volume."""
    out = []
    for item in condition:
        where = torch.nonzero(item[:3].amax(0) > 0.5).float().mean(0).round().long()
        starts = [int(min(max(c - n // 2, 0), d - n)) for c, n, d in zip(where, size, item.shape[1:])]
        out.append(
            item[:, starts[0] : starts[0] + size[0], starts[1] : starts[1] + size[1], starts[2] : starts[2] + size[2]]
        )
    return torch.stack(out)


def test_med_ddpm_generates_what_its_mask_asks_for(tmp_path):
    """Toy task: every modality is bright (+0.8) inside the tumour and dark (-0.8) elsewhere in the brain. After
    training, each generated volume is bright where its own mask has tumour, and a second mask moves the bright
    region with it."""
    from brainsynth.conditioning.semantic_mask import MaskConditionedSampler
    from brainsynth.schedulers.ddim import ExactDDIMScheduler

    bundle = "brats_mri_med_ddpm"
    with bundle_scripts(BUNDLES / bundle):
        parser = _parser(bundle, ["train.json"], tmp_path, learning_rate=0.003, batch_size=2)
        torch.manual_seed(0)
        batches = []
        for batch in parser.get_parsed_content("train#dataloader"):
            condition = _crop_around_tumour(batch["condition"], (16, 16, 8))  # 4x fewer voxels: seconds, not minutes
            tumour = condition[:, :3].amax(1, keepdim=True) > 0.5  # necrotic core, edema, enhancing
            brain = condition.amax(1, keepdim=True) > 0.5
            image = torch.where(tumour, 0.8, torch.where(brain, -0.8, -1.0)).expand(-1, 4, -1, -1, -1).clone()
            batches.append({"image": image, "condition": condition})
            if len(batches) == 2:
                break
        trainer = parser.get_parsed_content("train#trainer")
        network = parser.get_parsed_content("network")
        _train_on(trainer, batches, 300)
        sampler = MaskConditionedSampler(
            ExactDDIMScheduler(250, schedule="cosine", clip_sample=True), network.out_channels, 10, False, seed=0
        )
        conditions = torch.cat([b["condition"] for b in batches])
        generated = sampler(conditions, network)
    tumour = conditions[:, :3].amax(1) > 0.5
    brain_only = (conditions[:, 3] > 0.5) & ~tumour
    for i in range(conditions.shape[0]):
        inside, outside = generated[i][:, tumour[i]].mean(), generated[i][:, brain_only[i]].mean()
        assert inside - outside > 0.3, (
            f"sample {i}: tumour {inside:.2f} vs rest of the brain {outside:.2f}: the generated volume does not "
            "follow its mask"
        )


def test_d3m_synthesis_follows_its_input_contrasts(tmp_path):
    """Toy task: the target is bright where the FLAIR input is above its median and dark elsewhere, the mask stream
    the same region. The synthesis of each input follows that input's pattern (not the other one's)."""
    from brainsynth.deformation.mssdm import MSSDMInferer

    bundle = "brats_mri_d3m_cemri"
    with bundle_scripts(BUNDLES / bundle):
        parser = _parser(bundle, ["train.json"], tmp_path, learning_rate=0.003)
        torch.manual_seed(0)
        batches = []
        for batch in parser.get_parsed_content("train#dataloader"):
            flair = batch["condition"][:, 2:3]
            bright = flair > flair.flatten(1).median(1).values[:, None, None, None]
            target = torch.cat([torch.where(bright, 0.8, -0.8), torch.where(bright, 1.0, -1.0)], dim=1)
            batches.append({**batch, "image": target})
            if len(batches) == 2:
                break
        trainer = parser.get_parsed_content("train#trainer")
        network = parser.get_parsed_content("network")
        _train_on(trainer, batches, 150)
        network.eval()
        sampler = MSSDMInferer(parser.get_parsed_content("scheduler"), num_inference_steps=10)
        condition, wanted = batches[0]["condition"], batches[0]["image"][:, :1]
        flipped = condition.flip(-2)  # the same inputs mirrored left-right: the answer must move with them
        results = []
        for cond in (condition, flipped):
            torch.manual_seed(0)
            with torch.no_grad():
                noise = torch.randn_like(batches[0]["image"])
                results.append(sampler.sample(noise, network, conditioning=cond, verbose=False)[:, :1])
    for i in range(wanted.shape[0]):
        for image, target, what in ((results[0], wanted, "input"), (results[1], wanted.flip(-2), "mirrored input")):
            r = torch.corrcoef(torch.stack([image[i].flatten(), target[i].flatten()]))[0, 1]
            assert r > 0.8, f"slice {i}: synthesis vs its {what}'s pattern r = {r:.2f}; the input is not followed"


def test_ldm_conditions_and_guidance_choose_the_modality():
    """Toy task in the latent space: the latent is +1 everywhere for T1w and -1 for T2w, whatever the pathology.
    The bundle's conditional denoiser (concatenated and cross-attention conditions) learns it; sampling with each
    modality gives its sign, and guidance 3 separates the two more than guidance 1."""
    from monai.inferers import DiffusionInferer

    from brainsynth.conditioning.categorical import GuidedDenoiser
    from brainsynth.schedulers.targets import SchedulerTargetPrepareBatch

    bundle = "brain_mri_conditional_ldm"
    with bundle_scripts(BUNDLES / bundle):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in ("inference.json", "demo.json")])
        parser.update({**TINY[bundle]["overlay"], "latent_channels": 2})
        cond = parser.get_parsed_content("conditioning")
        network = parser.get_parsed_content("network_def")
        scheduler = parser.get_parsed_content("scheduler")
    targets = SchedulerTargetPrepareBatch(scheduler.num_train_timesteps, scheduler=scheduler)
    torch.manual_seed(0)
    modalities = ["t1w", "t2w"]
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    network.train()
    for step in range(300):
        labels = torch.randint(0, 2, (8,))
        pathology = torch.randint(0, len(cond.vocabularies["pathology"]), (8,))
        idx = torch.stack(
            [torch.stack([p, torch.tensor(cond.index("modality", modalities[m]))]) for p, m in zip(pathology, labels)]
        )
        x0 = torch.where(labels[:, None, None, None, None] == 0, 1.0, -1.0).expand(8, 2, 4, 4, 4)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.num_train_timesteps, (8,))
        target = targets.get_target(x0, noise, t)  # what the demo's scheduler expects (the velocity)
        loss = torch.nn.functional.mse_loss(network(scheduler.add_noise(x0, noise, t), t, idx), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()

    def sample(modality: str, scale: float) -> torch.Tensor:
        scheduler.set_timesteps(10)  # the bundle's sampler: deterministic DDIM on the training schedule
        idx = torch.stack([cond.encode(modality=modality)] * 4)
        torch.manual_seed(1)
        with torch.no_grad():
            return DiffusionInferer(scheduler).sample(
                torch.randn(4, 2, 4, 4, 4), GuidedDenoiser(network, scale), scheduler, conditioning=idx, verbose=False
            )

    means = {(m, g): sample(m, g).mean().item() for m in modalities for g in (1.0, 3.0)}
    assert means[("t1w", 1.0)] > 0.3 and means[("t2w", 1.0)] < -0.3, (
        f"mean latent for T1w {means[('t1w', 1.0)]:.2f}, for T2w {means[('t2w', 1.0)]:.2f}: "
        "the generated latents do not follow the modality condition"
    )
    gap1 = means[("t1w", 1.0)] - means[("t2w", 1.0)]
    gap3 = means[("t1w", 3.0)] - means[("t2w", 3.0)]
    assert gap3 > gap1, f"guidance 3 separates the modalities by {gap3:.2f}, guidance 1 by {gap1:.2f}"

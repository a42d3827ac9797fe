"""Preview PNGs during training: ``fn`` of ``brainsynth.engine.training.TrainingPreview`` for both stages.

Stage 1 (autoencoder): one fixed scan and its reconstruction from the latent mean. Stage 2 (latent U-Net): one
sample per preview combination from the EMA network with fixed noise. The same input / noise every time, so
successive PNGs show training progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from monai.networks.utils import eval_mode


class ReconstructionPreview:
    """Stage 1: ``dataset[0]`` (a preprocessed scan, (1, H, W, D) in [0, 1]) and its reconstruction."""

    def __init__(self, autoencoder: torch.nn.Module, dataset: Any, out_dir: str):
        self.autoencoder, self.dataset, self.out_dir = autoencoder, dataset, Path(out_dir)

    def __call__(self, engine: Any) -> Path:
        from brainsynth.engine.preview import save_training_preview

        from .latent_autoencoder import AutoencoderReconstructionInferer

        item = self.dataset[0]
        image = torch.as_tensor(item["image"]).float()
        device = next(self.autoencoder.parameters()).device
        with eval_mode(self.autoencoder):
            recon = AutoencoderReconstructionInferer()(image[None].to(device), self.autoencoder)[0].float().cpu()
        name = f"{item.get('pathology', '')} {item.get('modality', '')}".strip()
        return save_training_preview(
            engine,
            self.out_dir,
            {f"{name} input": image[0], "reconstruction": recon[0]},
            title=f"autoencoder, iteration {engine.state.iteration}",
        )


class SamplePreview:
    """Stage 2: one sample per (pathology, modality) in ``combinations`` from ``network`` (the EMA denoiser) with
    classifier-free guidance, decoded by the autoencoder; noise from ``seed``, the same at every preview."""

    def __init__(
        self,
        network: torch.nn.Module,
        autoencoder: torch.nn.Module,
        scheduler: Any,
        conditioning: Any,
        latent_shape: Sequence[int],
        combinations: Sequence[Sequence[str]],
        out_dir: str,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        guidance_mode: str = "per_condition",
    ):
        self.network, self.autoencoder, self.scheduler = network, autoencoder, scheduler
        self.conditioning, self.latent_shape = conditioning, [int(s) for s in latent_shape]
        self.combinations = [tuple(c) for c in combinations]
        self.out_dir, self.seed, self.num_inference_steps = Path(out_dir), int(seed), int(num_inference_steps)
        self.guidance_scale, self.guidance_mode = guidance_scale, guidance_mode

    def __call__(self, engine: Any) -> Path:
        from monai.data import list_data_collate

        from brainsynth.conditioning.categorical import GuidedDenoiser
        from brainsynth.engine.preview import save_training_preview

        from .latent_sampling import LatentSampler, NoisePrepareBatch, condition_requests

        rows = condition_requests(self.conditioning, combinations=self.combinations, seed=self.seed)
        device = next(self.network.parameters()).device
        noise, _, _, kwargs = NoisePrepareBatch(self.latent_shape)(list_data_collate(rows), device=device)
        sampler = LatentSampler(self.autoencoder, self.scheduler, self.num_inference_steps, verbose=False)
        guided = GuidedDenoiser(self.network, self.guidance_scale, self.guidance_mode)
        with eval_mode(self.network):
            images = sampler(noise, guided, **kwargs).float().cpu()
        volumes = {r["name"].rsplit("_", 1)[0]: images[i, 0] for i, r in enumerate(rows)}
        return save_training_preview(
            engine, self.out_dir, volumes, title=f"latent diffusion (EMA), iteration {engine.state.iteration}"
        )

"""The bundle's ``inferer``: the latent sampler of the inference workflow, which MONAI Label can also call.

The inference workflow calls ``inferer(noise, guided_network, conditioning=indices)`` (rows from
``condition_requests``, noise from each row's seed). MONAI Label's stock ``monaibundle`` app calls
``inferer(image, network)`` with the volume the user sent (it only fixes the output grid: the LDM generates from
its conditions) and the bare ``network_def`` loaded from models/model.pt; it never runs the config's
``initialize``. Then this draws the noise of the request's first sample (``seed``) itself, encodes the request's
pathology and modality (``displayable_configs``), wraps the network in classifier-free guidance, loads the
autoencoder's weights, and samples: the same volume the inference workflow writes for that request and seed.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from monai.inferers import Inferer


class RequestSampler(Inferer):
    def __init__(
        self,
        sampler: Any,
        conditioning: Any,
        latent_shape: Sequence[int],
        pathology: str,
        modality: str,
        seed: int,
        guidance_scale: Any,
        guidance_mode: str,
        autoencoder_path: str | os.PathLike,
        bundle_root: str | os.PathLike,
    ):
        super().__init__()
        self.sampler, self.conditioning, self.latent_shape = sampler, conditioning, [int(s) for s in latent_shape]
        self.pathology, self.modality, self.seed = pathology, modality, int(seed)
        self.guidance_scale, self.guidance_mode = guidance_scale, guidance_mode
        self.autoencoder_path, self.bundle_root = autoencoder_path, bundle_root

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args: Any,
        conditioning: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if conditioning is not None:  # the bundle's own inference workflow
            return self.sampler(inputs, network, *args, conditioning=conditioning, **kwargs)
        return self.sample_request(network, inputs.device)

    @torch.no_grad()
    def sample_request(self, network: torch.nn.Module, device: torch.device) -> torch.Tensor:
        from monai.data import list_data_collate

        from brainsynth.conditioning.categorical import GuidedDenoiser
        from brainsynth.engine.bundle_archive import verify_large_files
        from brainsynth.engine.io import load_checkpoint

        from .latent_sampling import NoisePrepareBatch, condition_requests

        rows = condition_requests(self.conditioning, self.pathology, self.modality, 1, seed=self.seed)
        verify_large_files(self.bundle_root)
        autoencoder = self.sampler.autoencoder
        autoencoder.load_state_dict(load_checkpoint(self.autoencoder_path, map_location=device))
        autoencoder.to(device)
        noise, _, _, kwargs = NoisePrepareBatch(self.latent_shape)(list_data_collate(rows), device=device)
        guided = (
            network
            if isinstance(network, GuidedDenoiser)
            else GuidedDenoiser(network.eval(), self.guidance_scale, self.guidance_mode)
        )
        return self.sampler(noise, guided, **kwargs)

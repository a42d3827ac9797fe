"""Preview PNGs during D3M training: ``fn`` of ``brainsynth.engine.training.TrainingPreview`` (configs/train.json).

Every ``preview_every`` iterations the EMA network synthesises T1ce (and the enhancing mask) for a few axial
slices of one fixed training subject, from the same noise each time, so successive PNGs show training progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from monai.networks.utils import eval_mode


class SlicePreviewWriter:
    """Sample ``max_slices`` central slices of ``dataset[0]`` with ``inferer.sample`` and write a PNG.

    ``dataset[0]`` holds (C, H, W, D) stacks "condition" (the input modalities) and "image" (the target, then the
    mask when the network has a mask stream), as the training preprocessing leaves them before slice sampling.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: Any,
        dataset: Any,
        condition_modalities: Sequence[str],
        target_modality: str,
        out_dir: str,
        seed: int = 0,
        num_inference_steps: int = 10,
        max_slices: int = 8,
    ):
        self.network, self.inferer, self.dataset = network, inferer, dataset
        self.condition_modalities, self.target_modality = list(condition_modalities), target_modality
        self.out_dir, self.seed = Path(out_dir), int(seed)
        self.num_inference_steps, self.max_slices = int(num_inference_steps), int(max_slices)

    def __call__(self, engine: Any) -> Path:
        from brainsynth.engine.preview import save_training_preview

        item = self.dataset[0]
        condition = torch.as_tensor(item["condition"]).float()
        target = torch.as_tensor(item["image"]).float()
        depth = condition.shape[-1]
        first = max(0, (depth - self.max_slices) // 2)
        picked = slice(first, first + min(depth, self.max_slices))
        slices = condition[..., picked].permute(3, 0, 1, 2)  # (n, C, H, W): one batch of axial slices
        device = next(self.network.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)  # same noise at every preview
        noise = torch.randn((slices.shape[0], target.shape[0], *slices.shape[2:]), generator=generator)
        with eval_mode(self.network):
            sample = self.inferer.sample(
                noise.to(device),
                self.network,
                conditioning=slices.to(device),
                num_inference_steps=self.num_inference_steps,
                verbose=False,
            )
        sample = sample.float().cpu().permute(1, 2, 3, 0)  # back to (C, H, W, n)
        volumes = {f"{m} (input)": condition[c, ..., picked] for c, m in enumerate(self.condition_modalities)}
        volumes[f"{self.target_modality} real"] = target[0, ..., picked]
        volumes[f"{self.target_modality} synthetic"] = sample[0].clamp(-1, 1)
        if sample.shape[0] > 1:  # the mask stream is in the diffusion range, foreground > 0
            volumes["mask real"] = (target[1, ..., picked] > 0).float()
            volumes["mask predicted"] = (sample[1] > 0).float()
        return save_training_preview(engine, self.out_dir, volumes)

"""Is the deformation driven by a usable mask estimate? Diagnostics for MSSDM, in training and in studies.

At fixed noise levels, on fixed held-out slices and fixed noise: the Dice of the thresholded mask channel of the
network's clean estimate x0 against the true mask, and the displacement field the deformer makes from that
estimate (mean and maximum magnitude in pixels, smoothness as the training loss measures it). A deformation can
only help where the mask estimate already locates the region; these numbers say from which noise level on it does.
``DiagnosticsLogger`` logs them during training (TensorBoard scalars and ``diagnostics.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.networks.utils import eval_mode

from .estimation import smoothness_loss
from .mssdm import _bare, predict_x0

#: noise levels (training timesteps of a 1000-step schedule) at which the diagnostics are taken
DEFAULT_TIMESTEPS = (100, 250, 500, 750, 900)


def _dice(pred: torch.Tensor, true: torch.Tensor) -> float:
    inter = (pred & true).sum().item()
    total = pred.sum().item() + true.sum().item()
    return 1.0 if total == 0 else 2.0 * inter / total


@torch.no_grad()
def mask_estimate_diagnostics(
    network: torch.nn.Module,
    scheduler: Any,
    target: torch.Tensor,
    condition: torch.Tensor,
    mask_channel: int = 1,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Per noise level t: ``mask_dice`` (x0 mask > 0 vs target mask > 0, over all slices together),
    ``noisy_mask_dice`` (the noisy input's mask channel > 0, the no-skill reference) and, with a deformer,
    ``field_mean_px`` / ``field_max_px`` / ``field_smoothness`` and ``field_tumour_mean_px`` (mean magnitude inside
    the true mask).

    ``target`` (B, C, H, W) is the clean target in the diffusion range (T1ce, mask), ``condition`` (B, Cc, H, W);
    the same ``seed`` gives the same noise, so values logged at different iterations are comparable.
    """
    bare = _bare(network)
    device = next(bare.parameters()).device
    target, condition = target.float().to(device), condition.float().to(device)
    if not 0 <= mask_channel < target.shape[1]:
        raise ValueError(f"mask_channel {mask_channel} is not one of the target's {target.shape[1]} channels")
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    true_mask = target[:, mask_channel] > 0
    prediction_type = getattr(bare, "prediction_type", scheduler.prediction_type)
    out: dict[int, dict[str, float]] = {}
    with eval_mode(bare):
        for t in timesteps:
            t_batch = torch.full((target.shape[0],), int(t), device=device, dtype=torch.long)
            noisy = scheduler.add_noise(original_samples=target, noise=noise, timesteps=t_batch)
            alpha_bar = scheduler.alphas_cumprod.to(device)[t_batch].float()
            output = bare(torch.cat([noisy, condition], dim=1), timesteps=t_batch).float()
            x0 = predict_x0(output, noisy, alpha_bar, prediction_type).clamp(-1.0, 1.0)
            entry = {
                "mask_dice": _dice(x0[:, mask_channel] > 0, true_mask),
                # what thresholding the noisy mask itself gives: the estimate is only worth something above it
                "noisy_mask_dice": _dice(noisy[:, mask_channel] > 0, true_mask),
            }
            if getattr(bare, "has_deformer", False):
                field = bare.estimate_field(x0)
                magnitude = field.norm(dim=1)
                entry.update(
                    field_mean_px=float(magnitude.mean()),
                    # where a correction of the enhancement has to happen
                    field_tumour_mean_px=float(magnitude[true_mask].mean()) if true_mask.any() else 0.0,
                    field_max_px=float(magnitude.max()),
                    field_smoothness=float(smoothness_loss(field)),
                )
            out[int(t)] = entry
    return out


def slices_batch(item: dict, max_slices: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, condition) batches of up to ``max_slices`` evenly spaced axial slices from one preprocessed item
    holding (C, H, W, D) stacks ``image`` (target channels) and ``condition``."""
    image, condition = torch.as_tensor(item["image"]).float(), torch.as_tensor(item["condition"]).float()
    depth = image.shape[-1]
    picks = torch.linspace(0, depth - 1, min(depth, max_slices)).round().long().unique()
    return image[..., picks].permute(3, 0, 1, 2), condition[..., picks].permute(3, 0, 1, 2)


class DiagnosticsLogger:
    """Ignite handler: every ``every_n`` iterations, ``mask_estimate_diagnostics`` of ``network`` on the slices of
    ``dataset`` (each item as for ``slices_batch``), written as TensorBoard scalars ``diagnostics/<name>_t<t>``
    and one JSON line per evaluation in ``<log_dir>/diagnostics.jsonl`` (a resumed run appends; readers keep the
    last line per iteration)."""

    def __init__(
        self,
        network: torch.nn.Module,
        scheduler: Any,
        dataset: Any,
        log_dir: str,
        every_n: int = 100,
        mask_channel: int = 1,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        max_slices: int = 16,
        seed: int = 0,
    ):
        self.network, self.scheduler, self.dataset = network, scheduler, dataset
        self.log_dir, self.every_n, self.mask_channel = Path(log_dir), int(every_n), int(mask_channel)
        self.timesteps, self.max_slices, self.seed = tuple(int(t) for t in timesteps), int(max_slices), int(seed)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._writer = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.every_n > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n), self)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch is None:
            pairs = [slices_batch(self.dataset[i], self.max_slices) for i in range(len(self.dataset))]
            self._batch = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        return self._batch

    def __call__(self, engine) -> dict[int, dict[str, float]]:
        from brainsynth.engine.training import is_main_process

        if not is_main_process():
            return {}
        target, condition = self.batch()
        values = mask_estimate_diagnostics(
            self.network, self.scheduler, target, condition, self.mask_channel, self.timesteps, self.seed
        )
        iteration = int(engine.state.iteration)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        for t, entry in values.items():
            for name, value in entry.items():
                self._writer.add_scalar(f"diagnostics/{name}_t{t}", value, iteration)
        self._writer.flush()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "diagnostics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, "values": {str(t): e for t, e in values.items()}}) + "\n")
        return values


def read_diagnostics(path: str | Path) -> dict[int, dict[str, dict[str, float]]]:
    """``diagnostics.jsonl`` as {iteration: {t: values}}, the last line winning for a repeated iteration."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[int(record["iteration"])] = record["values"]
    return dict(sorted(out.items()))

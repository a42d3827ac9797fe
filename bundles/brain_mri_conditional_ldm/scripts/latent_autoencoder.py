"""Stage 1 and the bridge to stage 2 of a latent diffusion model, as pieces for MONAI's engines.

Stage 1 trains MONAI's ``AutoencoderKL`` with MONAI's ``AdversarialTrainer`` (``PatchDiscriminator`` +
``PatchAdversarialLoss``). That trainer calls ``g_inferer(images, g_network)`` and ``recon_loss_function(
reconstruction, images)``; the autoencoder's KL term needs ``z_mu, z_sigma`` from the same forward pass, so:

- ``AutoencoderPrepareBatch`` makes the image its own target.
- ``AutoencoderKLInferer`` runs the autoencoder, returns the reconstruction and keeps the KL divergence of that
  forward pass; ``ReconstructionKLLoss`` adds it (and an optional perceptual term) to the L1 reconstruction loss.
- ``GeneratorAdversarialLoss`` / ``DiscriminatorAdversarialLoss`` adapt ``PatchAdversarialLoss`` to the
  trainer's call signatures (the discriminator's last output holds the logits) and switch on after
  ``start_iteration`` (a warm-up on reconstruction alone; attach them as handlers so the switch follows the
  trainer's iteration, also after a resume).

The latent scale factor (1 / std of latents, Rombach et al.) makes the latents unit-variance for the diffusion
model. ``LatentAutoencoderKL`` carries it as a buffer, so it is saved and loaded **with the autoencoder weights**;
``LatentScaleFactor`` computes it from training batches when stage 1 ends (attach it before the checkpoint
handler), and ``LatentDiffusionPrepareBatch`` / ``decode_latents`` use it in stage 2 and at inference.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
import torch
from monai.engines import PrepareBatch
from monai.engines.utils import default_prepare_batch
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys
from torch import nn

from brainsynth.engine.training import unwrap
from brainsynth.schedulers.targets import SchedulerTargetPrepareBatch

logger = logging.getLogger(__name__)


class LatentAutoencoderKL(AutoencoderKL):
    """MONAI ``AutoencoderKL`` that stores its latent scale factor as a buffer (NaN until computed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("latent_scale_factor", torch.tensor(float("nan")))

    @property
    def has_scale_factor(self) -> bool:
        return bool(torch.isfinite(self.latent_scale_factor))

    def scale_factor(self) -> float:
        if not self.has_scale_factor:
            raise RuntimeError(
                "the autoencoder has no latent scale factor: load the weights written at the end of "
                "stage 1 (train_autoencoder.json), which computes it from the training data"
            )
        return float(self.latent_scale_factor)


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels and channels, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


class AutoencoderKLInferer(Inferer):
    """``inferer(images, autoencoder) -> reconstruction``; ``.kl`` is the KL term of that forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.kl: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        reconstruction, z_mu, z_sigma = network(inputs)
        self.kl = kl_divergence(z_mu, z_sigma)
        return reconstruction


class ReconstructionKLLoss(nn.Module):
    """L1(reconstruction, image) + kl_weight * KL (+ perceptual_weight * perceptual, when a perceptual loss is
    given; it needs pretrained weights, which the user supplies)."""

    def __init__(
        self,
        inferer: AutoencoderKLInferer,
        kl_weight: float = 1e-6,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.001,
    ) -> None:
        super().__init__()
        self.inferer = inferer
        self.kl_weight = float(kl_weight)
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = float(perceptual_weight)
        self.last: dict[str, float] = {}

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.inferer.kl is None:
            raise RuntimeError("ReconstructionKLLoss needs AutoencoderKLInferer as the generator inferer")
        l1 = torch.nn.functional.l1_loss(reconstruction.float(), target.float())
        loss = l1 + self.kl_weight * self.inferer.kl
        self.last = {"l1": float(l1.detach()), "kl": float(self.inferer.kl.detach())}
        if self.perceptual_loss is not None:
            p = self.perceptual_loss(reconstruction.float(), target.float())
            loss = loss + self.perceptual_weight * p
            self.last["perceptual"] = float(p.detach())
        return loss


class AutoencoderPrepareBatch(PrepareBatch):
    """``prepare_batch`` for autoencoder training: the image is both the input and the target."""

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return images, images


class _WarmupAdversarial(nn.Module):
    """Shared by the two adversarial adapters: off (0, graph kept) until ``start_iteration`` has passed."""

    def __init__(self, weight: float, start_iteration: int = 0, criterion: str = "least_squares") -> None:
        super().__init__()
        self.weight = float(weight)
        self.start_iteration = int(start_iteration)
        self.adversarial = PatchAdversarialLoss(criterion=criterion)
        self.active = self.start_iteration <= 0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        def _update(e) -> None:
            self.active = e.state.iteration > self.start_iteration

        engine.add_event_handler(Events.ITERATION_STARTED, _update)

    @staticmethod
    def _logits(output: Any) -> torch.Tensor:
        # PatchDiscriminator returns every intermediate feature map; the last one is the patch logits
        return output[-1] if isinstance(output, (list, tuple)) else output


class GeneratorAdversarialLoss(_WarmupAdversarial):
    """``g_loss_function(fake_logits)`` for ``AdversarialTrainer``: weight * adversarial(fakes judged real)."""

    def forward(self, fake_output: Any) -> torch.Tensor:
        loss = self.adversarial(self._logits(fake_output), target_is_real=True, for_discriminator=False)
        return loss * (self.weight if self.active else 0.0)


class DiscriminatorAdversarialLoss(_WarmupAdversarial):
    """``d_loss_function(real_logits, fake_logits)``: weight * mean of the real and fake discriminator losses."""

    def forward(self, real_output: Any, fake_output: Any) -> torch.Tensor:
        fake = self.adversarial(self._logits(fake_output), target_is_real=False, for_discriminator=True)
        real = self.adversarial(self._logits(real_output), target_is_real=True, for_discriminator=True)
        return 0.5 * (fake + real) * (self.weight if self.active else 0.0)


@torch.no_grad()
def compute_latent_scale_factor(
    autoencoder: nn.Module,
    batches: Iterable,
    num_batches: int = 8,
    image_key: str = CommonKeys.IMAGE,
    device: str | torch.device | None = None,
) -> float:
    """1 / std of the autoencoder's latents (``encode_stage_2_inputs``) over the first ``num_batches`` batches."""
    net = unwrap(autoencoder)
    was_training = net.training
    net.eval()
    device = device or next(net.parameters()).device
    total, total_sq, count = 0.0, 0.0, 0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        images = batch[image_key] if isinstance(batch, dict) else batch
        z = net.encode_stage_2_inputs(torch.as_tensor(images).to(device)).double()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
        count += z.numel()
    net.train(was_training)
    if count < 2:
        raise ValueError("no batches to compute the latent scale factor from")
    var = (total_sq - total * total / count) / (count - 1)
    if not math.isfinite(var) or var <= 0:
        raise ValueError(f"latent variance is {var}: the autoencoder's latents are degenerate")
    return 1.0 / math.sqrt(var)


class LatentScaleFactor:
    """Ignite handler: when training completes, compute the latent scale factor from ``data_loader`` and store
    it in the autoencoder's ``latent_scale_factor`` buffer. Attach it **before** the checkpoint handler so the
    final weights carry it."""

    def __init__(
        self, autoencoder: nn.Module, data_loader: Iterable, num_batches: int = 8, image_key: str = CommonKeys.IMAGE
    ) -> None:
        self.autoencoder = autoencoder
        self.data_loader = data_loader
        self.num_batches = int(num_batches)
        self.image_key = image_key

    def __call__(self, engine=None) -> float:
        net = unwrap(self.autoencoder)
        if not hasattr(net, "latent_scale_factor"):
            raise TypeError("LatentScaleFactor needs a scripts.latent_autoencoder.LatentAutoencoderKL")
        value = compute_latent_scale_factor(net, self.data_loader, self.num_batches, self.image_key)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each rank saw different batches: use the mean so every copy of the weights agrees
            t = torch.tensor([value], dtype=torch.float64, device=net.latent_scale_factor.device)
            torch.distributed.all_reduce(t)
            value = float(t) / torch.distributed.get_world_size()
        net.latent_scale_factor.fill_(value)
        logger.info("latent scale factor (1 / std of latents over %d batches): %.5f", self.num_batches, value)
        return value

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)


class LatentDiffusionPrepareBatch(SchedulerTargetPrepareBatch):
    """MONAI ``DiffusionPrepareBatch`` on latents: images are encoded by the frozen autoencoder and multiplied
    by its latent scale factor first, so noise, timesteps and targets are drawn in latent space and MONAI's
    ``DiffusionInferer`` / ``SupervisedTrainer`` train the latent U-Net unchanged. The target follows the
    training ``scheduler``'s ``prediction_type`` (noise, velocity or clean latent)."""

    def __init__(
        self,
        autoencoder: nn.Module,
        num_train_timesteps: int,
        condition_name: str | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name, scheduler=scheduler)
        self.autoencoder = autoencoder

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        net = unwrap(self.autoencoder)
        net.eval()
        return net.encode_stage_2_inputs(images) * net.scale_factor()

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ):
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        latent_batch = dict(batchdata)
        latent_batch[CommonKeys.IMAGE] = self.encode(images.as_tensor() if hasattr(images, "as_tensor") else images)
        latent_batch.pop(CommonKeys.LABEL, None)
        return super().__call__(latent_batch, device, non_blocking, **kwargs)


@torch.no_grad()
def decode_latents(autoencoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (as the diffusion model produces them) -> images."""
    net = unwrap(autoencoder)
    return net.decode_stage_2_outputs(latents / net.scale_factor())


class TrainerProgress:
    """The iteration / epoch counters of an ignite trainer as a weights-only ``state_dict`` for
    ``brainsynth.engine.training.ResumableCheckpoint``.

    TODO(lead): ``AdversarialTrainer.state_dict()`` also returns its networks, optimizers and losses as objects
    (its ``_state_dict_user_keys``), which cannot be written as a weights-only checkpoint; until
    ResumableCheckpoint handles that, stage 1 saves this adapter (networks and optimizers are saved by name).
    """

    def __init__(self, engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, int]:
        s = self.engine.state
        return {"iteration": int(s.iteration), "epoch": int(s.epoch), "epoch_length": int(s.epoch_length or 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        s = self.engine.state
        if state.get("epoch_length") and s.epoch_length and int(state["epoch_length"]) != int(s.epoch_length):
            raise ValueError(
                f"checkpoint was written with epoch_length {state['epoch_length']}, this run uses "
                f"{s.epoch_length}; resume with the same epoch length"
            )
        s.iteration, s.epoch = int(state["iteration"]), int(state["epoch"])


def output_scalars(keys: list[str]):
    """``output_transform`` for MONAI's Stats/TensorBoard handlers logging several scalar outputs by name."""
    from monai.handlers import from_engine

    pick = from_engine(list(keys), first=True)

    def transform(output: Any) -> dict[str, float]:
        # detached first: a loss tensor still attached to the graph would make torch warn on conversion
        return {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in zip(keys, pick(output))}

    return transform


# --- reconstruction check (inference_autoencoder.json) ---------------------------------------------------------
class AutoencoderReconstructionInferer(Inferer):
    """``inferer(images, autoencoder) -> reconstruction`` from the latent mean (deterministic, no sampling)."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = unwrap(network)
        z_mu, _ = net.encode(inputs)
        return net.decode(z_mu)


class ReconstructionReport:
    """Ignite handler for an evaluator running ``AutoencoderReconstructionInferer``: per scan, writes the
    reconstruction and its absolute error as NIfTI (``<subject>_<modality>_reconstruction / _error``), and
    records mean absolute error, PSNR and 3D SSIM (MONAI metrics, data range 1); at the end writes
    ``reconstruction_metrics.json`` / ``.md`` (all scans, and seen / held-out combinations separately) and a
    preview PNG of the first scan (image, reconstruction, error)."""

    def __init__(
        self,
        output_dir: str | Any,
        pixdim: Any = (1.0, 1.0, 1.0),
        held_out: Any = None,
        overwrite: bool = False,
        save_volumes: bool = True,
    ) -> None:
        from pathlib import Path

        self.output_dir = Path(output_dir)
        self.pixdim = tuple(float(p) for p in pixdim)
        self.held_out = {(str(p).lower(), str(m).lower()) for p, m in (held_out or [])}
        self.overwrite = overwrite
        self.save_volumes = save_volumes
        self.rows: list[dict[str, Any]] = []
        self._preview: dict[str, Any] | None = None

    def collect(self, engine) -> None:
        from monai.metrics import PSNRMetric, SSIMMetric

        from brainsynth.engine.io import save_nifti

        from .latent_sampling import pixdim_affine

        for row, item in zip(engine.state.batch, engine.state.output):
            image = torch.as_tensor(item["image"]).detach().float().cpu()[None]
            recon = torch.as_tensor(item["pred"]).detach().float().cpu()[None]
            kernel = min(7, min(image.shape[2:]) // 2 * 2 - 1)
            name = f"{row['subject']}_{row['modality']}"
            entry = {
                "scan": name,
                "pathology": row["pathology"],
                "modality": row["modality"],
                "split": "held-out" if (row["pathology"], row["modality"]) in self.held_out else "seen",
                "mae": float((recon - image).abs().mean()),
                "psnr": float(PSNRMetric(max_val=1.0)(recon.clamp(0, 1), image)),
                "ssim": float(SSIMMetric(spatial_dims=3, data_range=1.0, win_size=kernel)(recon.clamp(0, 1), image)),
            }
            self.rows.append(entry)
            if self.save_volumes:
                affine = pixdim_affine(self.pixdim, image.shape[2:])
                save_nifti(
                    recon[0, 0].numpy(),
                    self.output_dir / f"{name}_reconstruction.nii.gz",
                    affine=affine,
                    overwrite=self.overwrite,
                )
                save_nifti(
                    (recon - image).abs()[0, 0].numpy(),
                    self.output_dir / f"{name}_error.nii.gz",
                    affine=affine,
                    overwrite=self.overwrite,
                )
            if self._preview is None:
                self._preview = {
                    "title": name,
                    "volumes": {
                        "image": image[0, 0].numpy(),
                        "reconstruction": recon[0, 0].clamp(0, 1).numpy(),
                        "abs error": (recon - image).abs()[0, 0].numpy(),
                    },
                }

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in ("all", "seen", "held-out"):
            rows = [r for r in self.rows if group == "all" or r["split"] == group]
            if rows:
                out[group] = {"n_scans": len(rows)} | {
                    f"{k}_{stat}": float(getattr(np, stat)([r[k] for r in rows]))
                    for k in ("mae", "psnr", "ssim")
                    for stat in ("mean", "std")
                }
        return out

    def write(self, engine=None) -> dict[str, Any]:
        import json

        from brainsynth.engine.io import atomic_write_text
        from brainsynth.engine.preview import save_preview

        summary = self.summary()
        atomic_write_text(
            self.output_dir / "reconstruction_metrics.json",
            json.dumps({"summary": summary, "scans": self.rows}, indent=2),
            overwrite=self.overwrite,
        )
        lines = ["| scans | n | mean absolute error | PSNR (dB) | SSIM (3D) |", "|---|---|---|---|---|"]
        for group, s in summary.items():
            lines.append(
                f"| {group} | {s['n_scans']} | {s['mae_mean']:.4f} +- {s['mae_std']:.4f} | "
                f"{s['psnr_mean']:.2f} +- {s['psnr_std']:.2f} | {s['ssim_mean']:.3f} +- {s['ssim_std']:.3f} |"
            )
        atomic_write_text(
            self.output_dir / "reconstruction_metrics.md", "\n".join(lines) + "\n", overwrite=self.overwrite
        )
        if self._preview is not None:
            save_preview(
                self._preview["volumes"],
                self.output_dir / "reconstruction_preview.png",
                overwrite=self.overwrite,
                spacing=self.pixdim,
                title=self._preview["title"],
            )
        logger.info("autoencoder reconstruction: %s", summary)
        return summary

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

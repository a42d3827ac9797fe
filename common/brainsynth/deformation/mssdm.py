"""D3M's multi-step spatial deformation (MSSDM) in training and in sampling.

Pieces, each usable from a MONAI bundle config:

``DeformableDenoiser``
    one ``nn.Module`` holding the denoiser (e.g. the dual-stream U-Net) and, optionally, the deformation-estimation
    U-Net, so the optimiser, EMA, checkpoints and DistributedDataParallel all see a single network. Called like a
    DiffusionModelUNet it returns the raw prediction; given each sample's alpha-bar it also runs the deformation
    branch (the whole computation stays inside one ``forward``, as DDP requires).
``MSSDMInferer``
    a ``monai.inferers.DiffusionInferer`` whose training call warps the predicted velocity with the field estimated
    from the mask estimate, and whose ``sample`` is deterministic DDIM (brainsynth.schedulers.ddim.ExactDDIMScheduler)
    that warps the clean-image estimate at every step and re-derives the noise from the warped estimate.
``WeightedDiffusionLoss``
    alpha-bar-weighted MSE on the (warped) prediction + lambda x alpha-bar-weighted smoothness of the field.
``GradientClipping``
    ignite handler: clip the gradient norm after backward (unscaling first under mixed precision).

Without a deformer (``no_mssdm`` ablation, Palette-like baseline) the same classes reduce to plain conditional
diffusion training and plain DDIM sampling.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import Scheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType
from torch import nn

from brainsynth.engine.acceleration import autocast
from brainsynth.schedulers.ddim import ExactDDIMScheduler

from .estimation import make_warp, smoothness_loss

PRED, FIELD, ALPHA_BAR = "pred", "field", "alpha_bar"


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) for broadcasting over a (B, C, *spatial) tensor."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def predict_x0(
    output: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str = DDPMPredictionType.V_PREDICTION,
) -> torch.Tensor:
    """Clean-sample estimate from a network output at per-sample noise levels ``alpha_bar`` (shape (B,)).

    v-prediction: x0 = sqrt(ab) x_t - sqrt(1 - ab) v; epsilon: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab).
    """
    ab = _per_sample(alpha_bar.to(sample.dtype), sample.ndim)
    if prediction_type == DDPMPredictionType.V_PREDICTION:
        return ab.sqrt() * sample - (1 - ab).sqrt() * output
    if prediction_type == DDPMPredictionType.EPSILON:
        return (sample - (1 - ab).sqrt() * output) / ab.sqrt()
    if prediction_type == DDPMPredictionType.SAMPLE:
        return output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def prediction_from_x0(
    x0: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str = DDPMPredictionType.V_PREDICTION,
) -> torch.Tensor:
    """The network output that a clean estimate ``x0`` implies at ``sample`` (the inverse of ``predict_x0``), as the
    DDIM sampler re-derives the noise from a deformed estimate.

    v-prediction: v = (sqrt(ab) x_t - x0) / sqrt(1 - ab); epsilon: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).
    """
    ab = _per_sample(alpha_bar.to(sample.dtype), sample.ndim)
    if prediction_type == DDPMPredictionType.V_PREDICTION:
        return (ab.sqrt() * sample - x0) / (1 - ab).sqrt()
    if prediction_type == DDPMPredictionType.EPSILON:
        return (sample - ab.sqrt() * x0) / (1 - ab).sqrt()
    if prediction_type == DDPMPredictionType.SAMPLE:
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


#: what the training forward warps: D3M's predicted velocity, or (as the sampler does) the clean estimate x0
WARP_TARGETS = ("prediction", "x0")


class DeformableDenoiser(nn.Module):
    """Denoiser + optional deformation estimator, as one network.

    Args:
        denoiser: network called as ``denoiser(x, timesteps)`` on the noisy target concatenated with the condition;
            it returns ``target_channels`` channels.
        deformer: network mapping the mask estimate (B, 1, *spatial) to a field (B, spatial_dims, *spatial), e.g.
            brainsynth.deformation.estimation.DeformationUNet; None disables MSSDM.
        target_channels: channels of the diffused target at the front of ``x`` (D3M: 2 = T1ce, mask).
        mask_channel: which target channel is the mask that guides the deformation.
        prediction_type: what the denoiser predicts (D3M: v_prediction); used to estimate the mask in training.
        warp_mode, padding_mode: MONAI Warp interpolation and padding.
        max_timestep: deform only samples whose training timestep is at most this (low noise only; None: every
            timestep, as D3M). The sampler takes the same limit (MSSDMInferer ``mssdm_max_timestep``).
        warp_target: "prediction" warps the network output in training (D3M, authors' code: the velocity holds the
            noisy input, which already lines up with the target, so this cannot correct a misplaced x0); "x0" warps
            the clamped clean estimate and re-derives the output from it, exactly as the sampler does.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        deformer: nn.Module | None = None,
        target_channels: int = 2,
        mask_channel: int = 1,
        prediction_type: str = DDPMPredictionType.V_PREDICTION,
        warp_mode: str = "bilinear",
        padding_mode: str = "border",
        max_timestep: int | None = None,
        warp_target: str = "prediction",
    ):
        super().__init__()
        if deformer is not None and not 0 <= mask_channel < target_channels:
            raise ValueError(f"mask_channel {mask_channel} is not one of the {target_channels} target channels")
        if warp_target not in WARP_TARGETS:
            raise ValueError(f"warp_target must be one of {WARP_TARGETS}, got {warp_target!r}")
        self.warp_target = warp_target
        self.denoiser = denoiser
        self.deformer = deformer
        self.target_channels = target_channels
        self.mask_channel = mask_channel
        self.prediction_type = prediction_type
        self.warp = make_warp(warp_mode, padding_mode)
        self.max_timestep = None if max_timestep is None else int(max_timestep)

    @property
    def has_deformer(self) -> bool:
        return self.deformer is not None

    def estimate_field(self, clean_estimate: torch.Tensor) -> torch.Tensor:
        """Displacement field from the mask channel of a clean-target estimate (B, target_channels, *spatial)."""
        if self.deformer is None:
            raise RuntimeError("this network has no deformer (MSSDM disabled)")
        return self.deformer(clean_estimate[:, self.mask_channel : self.mask_channel + 1])

    def deform(self, clean_estimate: torch.Tensor) -> torch.Tensor:
        """The MSSDM sampling hook: warp every channel of the clean estimate with the field of its own mask."""
        return self.warp(clean_estimate, self.estimate_field(clean_estimate))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        alpha_bar: torch.Tensor | None = None,
    ):
        """``alpha_bar`` None: the raw prediction. Given (B,) noise levels and a deformer: (warped prediction,
        field), where the field comes from the mask estimate implied by the prediction (D3M training)."""
        output = self.denoiser(x, timesteps) if context is None else self.denoiser(x, timesteps, context)
        if alpha_bar is None or self.deformer is None:
            return output
        noisy_target = x[:, : self.target_channels]
        # clamped to the data range as the authors do (and as sampling does), so the deformer sees the same inputs
        # in training and in sampling
        clean_estimate = predict_x0(output, noisy_target, alpha_bar, self.prediction_type).clamp(-1.0, 1.0)
        field = self.estimate_field(clean_estimate)
        if self.max_timestep is not None:  # no displacement (identity warp) above the limit
            field = field * _per_sample((timesteps <= self.max_timestep).to(field.dtype), field.ndim)
        if self.warp_target == "x0":
            warped = self.warp(clean_estimate, field)
            return prediction_from_x0(warped, noisy_target.float(), alpha_bar.float(), self.prediction_type), field
        return self.warp(output, field), field


def freeze_trained_denoiser(network: nn.Module, weights_path: str | None) -> nn.Module:
    """Load a trained model's denoiser weights (e.g. the no_mssdm model: same denoiser, no deformer) into
    ``network`` and freeze them, so training updates the deformer only; returns ``network`` (unchanged when
    ``weights_path`` is None: everything trains).

    This is the deformer's phase of a two-phase training: the denoiser cannot absorb the misplacement the deformer
    is meant to learn (trained jointly it does, within ~80 iterations, and the field collapses).
    """
    from brainsynth.engine.io import load_checkpoint

    if weights_path is None:
        return network
    bare = _bare(network)
    if not getattr(bare, "has_deformer", False):
        raise ValueError("freeze_trained_denoiser: the network has no deformer to train (use_mssdm is false)")
    state = load_checkpoint(weights_path, map_location=next(bare.parameters()).device, require_record=True)
    denoiser_state = {k[len("denoiser.") :]: v for k, v in state.items() if k.startswith("denoiser.")}
    if not denoiser_state:
        raise ValueError(f"{weights_path}: holds no denoiser weights (keys 'denoiser.*'); give a trained model file")
    try:
        bare.denoiser.load_state_dict(denoiser_state)
    except RuntimeError as e:
        raise ValueError(
            f"{weights_path}: its denoiser does not fit this network ({e}); train it with the same network settings"
        ) from e
    bare.denoiser.requires_grad_(False)
    return network


def _bare(network: nn.Module) -> nn.Module:
    from brainsynth.engine.training import unwrap

    return unwrap(network)


class MSSDMInferer(DiffusionInferer):
    """DiffusionInferer for D3M: deformation-aware training forward pass and MSSDM sampling.

    Args:
        scheduler: the training noise schedule (e.g. DDPMScheduler(1000, "sigmoid_alpha_bar", v_prediction)).
        sample_scheduler: the sampler; default an ExactDDIMScheduler with the same schedule and prediction type.
        num_inference_steps: DDIM steps when sampling (D3M: 250; fewer are selectable).
        eta: DDIM stochasticity (D3M: 0, deterministic).
        use_mssdm: warp the clean estimate at every sampling step when the network has a deformer.
        amp: mixed precision for the network calls: float16 autocast on CUDA while sampling (MONAI's engines autocast
            the training step there), bfloat16 on CPU in training and sampling (MONAI's engines autocast on CUDA
            only; 1.3x per demo training step on this project's CPU with bf16 units).
        mssdm_max_timestep: warp only at steps whose timestep is at most this (None: every step, as D3M).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        sample_scheduler: ExactDDIMScheduler | None = None,
        num_inference_steps: int = 250,
        eta: float = 0.0,
        use_mssdm: bool = True,
        amp: bool = False,
        mssdm_max_timestep: int | None = None,
    ):
        super().__init__(scheduler)
        if sample_scheduler is None:
            sample_scheduler = ExactDDIMScheduler(
                num_train_timesteps=scheduler.num_train_timesteps,
                prediction_type=scheduler.prediction_type,
                clip_sample=True,
            )
            # same noise levels as training, whatever the schedule's name and arguments were
            sample_scheduler.betas, sample_scheduler.alphas = scheduler.betas, scheduler.alphas
            sample_scheduler.alphas_cumprod = scheduler.alphas_cumprod
            sample_scheduler.final_alpha_cumprod = torch.tensor(1.0)
        if not isinstance(sample_scheduler, ExactDDIMScheduler):
            raise TypeError(
                "sample_scheduler must be a brainsynth.schedulers.ddim.ExactDDIMScheduler (it has the x0 hook)"
            )
        if sample_scheduler.num_train_timesteps != scheduler.num_train_timesteps:
            raise ValueError("training and sampling schedulers disagree on num_train_timesteps")
        if sample_scheduler.prediction_type != scheduler.prediction_type:
            raise ValueError(
                f"training predicts {scheduler.prediction_type} but the sampler expects "
                f"{sample_scheduler.prediction_type}"
            )
        self.sample_scheduler = sample_scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.eta = float(eta)
        self.use_mssdm = bool(use_mssdm)
        self.amp = bool(amp)
        self.mssdm_max_timestep = None if mssdm_max_timestep is None else int(mssdm_max_timestep)

    # --- training -------------------------------------------------------------------------------------------
    def __call__(
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,  # type: ignore[override]
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "concat",
        seg: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Noise ``inputs`` to ``timesteps``, predict, and (with a deformer) warp the prediction.

        Returns {"pred": prediction, "field": displacement or None, "alpha_bar": (B,) noise levels} for
        WeightedDiffusionLoss.
        """
        if mode != "concat":
            raise ValueError("MSSDMInferer conditions by channel concatenation only (mode='concat')")
        if condition is None:
            raise ValueError("MSSDMInferer needs the condition images (T1, T2, FLAIR)")
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        alpha_bar = self.scheduler.alphas_cumprod.to(inputs.device, inputs.dtype)[timesteps]
        x = torch.cat([noisy, condition], dim=1)
        with autocast(x, self.amp and not torch.is_autocast_enabled(x.device.type)):  # inside MONAI's, keep it
            if getattr(_bare(diffusion_model), "has_deformer", False):
                pred, field = diffusion_model(x, timesteps=timesteps, alpha_bar=alpha_bar)
            else:
                pred, field = diffusion_model(x, timesteps=timesteps), None
        if field is not None:
            field = field.float()
        return {PRED: pred.float(), FIELD: field, ALPHA_BAR: alpha_bar}

    # --- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        input_noise: torch.Tensor,
        diffusion_model: nn.Module,  # type: ignore[override]
        scheduler: ExactDDIMScheduler | None = None,
        save_intermediates: bool | None = False,
        intermediate_steps: int | None = 100,
        conditioning: torch.Tensor | None = None,
        mode: str = "concat",
        verbose: bool = True,
        seg: torch.Tensor | None = None,
        cfg: float | None = None,
        cfg_fill_value: float = -1.0,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """Deterministic DDIM from ``input_noise`` given ``conditioning``; MSSDM when the network has a deformer.

        ``x0_transform`` overrides the deformation hook (None: the network's own ``deform`` when MSSDM is on).
        Returns the final sample, or (sample, intermediates) with ``save_intermediates``.
        """
        if conditioning is None:
            raise ValueError("MSSDM sampling needs the condition images (T1, T2, FLAIR)")
        if cfg is not None:
            raise ValueError("classifier-free guidance is not part of D3M")
        scheduler = scheduler or self.sample_scheduler
        scheduler.set_timesteps(num_inference_steps or self.num_inference_steps, device=input_noise.device)
        network = _bare(diffusion_model)
        if x0_transform is None and self.use_mssdm and getattr(network, "has_deformer", False):
            x0_transform = network.deform
        timesteps = scheduler.timesteps
        if verbose:
            from tqdm.auto import tqdm

            timesteps = tqdm(timesteps, desc=f"DDIM{' + MSSDM' if x0_transform else ''}", leave=False)
        image, intermediates = input_noise, []
        precision = torch.float16 if image.is_cuda else torch.bfloat16
        for t in timesteps:
            t_batch = torch.full((image.shape[0],), int(t), device=image.device, dtype=torch.long)
            with autocast(image, self.amp, precision):
                output = diffusion_model(torch.cat([image, conditioning], dim=1), timesteps=t_batch)
            hook = x0_transform
            if hook is not None and self.mssdm_max_timestep is not None and int(t) > self.mssdm_max_timestep:
                hook = None
            image, _ = scheduler.step(
                output.float(), int(t), image, eta=self.eta, generator=generator, x0_transform=hook
            )
            if save_intermediates and int(t) % int(intermediate_steps or 1) == 0:
                intermediates.append(image)
        return (image, intermediates) if save_intermediates else image


class WeightedDiffusionLoss(nn.Module):
    """MSE on the prediction, per sample weighted by alpha-bar_t, + ``smoothness_weight`` x weighted smoothness.

    ``weighting="alpha_bar"`` is D3M's (alpha-bar = snr / (snr + 1)); ``"none"`` is plain MSE (Palette baseline).
    Takes the dict MSSDMInferer returns (a bare tensor prediction is treated as unweighted, without a field).
    """

    def __init__(self, smoothness_weight: float = 1.0, weighting: str = "alpha_bar"):
        super().__init__()
        if weighting not in ("alpha_bar", "none"):
            raise ValueError(f"weighting must be 'alpha_bar' or 'none', got {weighting!r}")
        self.smoothness_weight = float(smoothness_weight)
        self.weighting = weighting

    def forward(self, prediction: dict[str, Any] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(prediction, torch.Tensor):
            prediction = {PRED: prediction, FIELD: None, ALPHA_BAR: None}
        pred = prediction[PRED].float()
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        per_sample = (pred - target.float()).pow(2).flatten(1).mean(dim=1)
        weights = None
        if self.weighting == "alpha_bar" and prediction.get(ALPHA_BAR) is not None:
            weights = prediction[ALPHA_BAR].float().reshape(-1)
            per_sample = per_sample * weights
        loss = per_sample.mean()
        if prediction.get(FIELD) is not None and self.smoothness_weight:
            loss = loss + self.smoothness_weight * smoothness_loss(prediction[FIELD].float(), weights)
        return loss


class GradientClipping:
    """Clip the global gradient norm after each backward pass of a MONAI SupervisedTrainer.

    Under mixed precision the gradients are unscaled first (GradScaler.step then skips its own unscale).
    TODO(lead): generic training utility; move to brainsynth.engine.training if other bundles need it.
    """

    def __init__(self, max_norm: float = 1.0):
        self.max_norm = float(max_norm)

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        if self.max_norm > 0:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)

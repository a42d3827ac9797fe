"""Deterministic few-step sampling whose timestep arithmetic is exact.

MONAI 1.6.1's DDIMScheduler spaces its inference timesteps with ``linspace(T-1, 0, n).round()`` but its ``step``
assumes a fixed stride ``T // n`` to find the previous timestep. When ``T`` is not a multiple of ``n`` (e.g. T = 250
at 50 or 10 steps) the two disagree and some transitions jump to the wrong noise level (FACTS.md section 5).
``ExactDDIMScheduler`` keeps MONAI's schedules, prediction types and interface, but every step moves from its
timestep to the *true* next entry of its own sequence (and to the clean image after the last one), so it is a
drop-in replacement for ``monai.inferers.DiffusionInferer.sample``.

It also exposes ``x0_transform``: a hook applied to the clean-image estimate before the update, with the noise
re-derived from the transformed estimate. D3M's multi-step deformation (brainsynth.deformation.mssdm) is exactly such
a hook.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.networks.schedulers import DDIMScheduler
from monai.networks.schedulers.ddim import DDIMPredictionType


def exact_timesteps(num_train_timesteps: int, num_inference_steps: int, device=None) -> torch.Tensor:
    """Descending, evenly spread timesteps from T-1 down to 0 (unique, int64)."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")
    if num_inference_steps == 1:
        return torch.tensor([num_train_timesteps - 1], dtype=torch.long, device=device)
    return torch.linspace(num_train_timesteps - 1, 0, num_inference_steps, device=device).round().long()


class ExactDDIMScheduler(DDIMScheduler):
    """DDIM that steps to the true previous timestep of its own sequence.

    ``eta`` (default 0: deterministic) is the stochasticity used when ``step`` is called without one, as
    ``DiffusionInferer.sample`` does: eta = 1 is ancestral sampling respaced to ``num_inference_steps`` (its
    per-step noise comes from the global torch generator, like MONAI's DDPMScheduler).
    """

    def __init__(self, *args, eta: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = float(eta)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``device`` is accepted for MONAI's interface and ignored: the timesteps stay on the CPU, where MONAI's
        ``DiffusionInferer.sample`` concatenates them with a CPU tensor and where reading each one (``step`` takes
        it as a number) costs no wait for a GPU."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = exact_timesteps(self.num_train_timesteps, num_inference_steps)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep that follows ``timestep`` in the current sequence; -1 means the clean image."""
        t = int(timestep)
        seq = self.timesteps.tolist()
        try:
            i = seq.index(t)
        except ValueError as e:
            raise ValueError(f"timestep {t} is not in this scheduler's sequence (call set_timesteps first)") from e
        return seq[i + 1] if i + 1 < len(seq) else -1

    def _alpha_bar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def split_prediction(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 estimate, noise estimate) from the network output at ``timestep``, for any prediction type."""
        # coefficients in the schedule's precision (float64 schedules stay exact where alpha-bar is near 1); a 0-dim
        # tensor does not promote the sample, so results keep the sample's dtype
        ab = self._alpha_bar(int(timestep)).to(sample.device)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == DDIMPredictionType.EPSILON:
            return (sample - s * model_output) / a, model_output
        if self.prediction_type == DDIMPredictionType.SAMPLE:
            return model_output, (sample - a * model_output) / s
        if self.prediction_type == DDIMPredictionType.V_PREDICTION:
            return a * sample - s * model_output, a * model_output + s * sample
        raise ValueError(f"unsupported prediction_type {self.prediction_type}")

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_prev. Returns (x_prev, x0 estimate used for the update)."""
        eta = self.eta if eta is None else float(eta)
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        ab_t = self._alpha_bar(t).to(sample.device)
        ab_prev = self._alpha_bar(prev_t).to(sample.device)

        x0, eps = self.split_prediction(model_output, t, sample)
        if self.clip_sample:
            x0 = x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
        if x0_transform is not None or self.clip_sample:
            # keep x_t = sqrt(ab) x0 + sqrt(1 - ab) eps consistent with the (clipped / transformed) estimate
            if x0_transform is not None:
                x0 = x0_transform(x0)
            eps = (sample - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()

        # sigma_t(eta), DDIM eq. 16, between the two *actual* noise levels
        var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        std = eta * var.clamp(min=0).sqrt()
        prev = ab_prev.sqrt() * x0 + (1 - ab_prev - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = prev + std * noise
        return prev, x0

"""The training target that matches a scheduler's ``prediction_type``, for MONAI's diffusion engines.

MONAI's ``DiffusionPrepareBatch`` always targets the noise and its ``VPredictionPrepareBatch`` always the velocity;
a bundle whose ``prediction_type`` is a config key needs the target to follow the scheduler it trains with, or a
network trained on the noise is sampled as if it predicted the velocity (garbage, and nothing says so).
"""

from __future__ import annotations

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.networks.schedulers import Scheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class SchedulerTargetPrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` whose loss target is what ``scheduler`` expects the network to predict:
    the noise (``epsilon``), the velocity (``v_prediction``, from the scheduler as MONAI's VPredictionPrepareBatch
    does) or the clean image (``sample``). Without a scheduler: the noise."""

    def __init__(
        self, num_train_timesteps: int, condition_name: str | None = None, scheduler: Scheduler | None = None
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.prediction_type = getattr(scheduler, "prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}; set the "
                "bundle's prediction_type key to one of them"
            )
        self.scheduler = scheduler

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return images if self.prediction_type == "sample" else noise

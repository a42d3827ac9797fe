"""Higher-order ODE solvers from the diffusers library (DPM-Solver++, UniPC) behind MONAI's scheduler interface.

diffusers' multistep solvers are the diffusion community's well-tested few-step samplers; they work on any PyTorch
network. ``DiffusersSolver`` builds one on the exact noise schedule a MONAI ``DDPMScheduler`` trained with (its
betas are handed over, not re-derived) and exposes what MONAI's ``DiffusionInferer.sample`` and the bundles'
samplers use: ``set_timesteps``, ``timesteps``, ``num_train_timesteps`` and ``step(model_output, t, sample)``
returning ``(previous sample, None)``. Nothing is re-implemented here; diffusers is an optional dependency
(``pip install diffusers``) needed only when a config names this class.

Used by one bundle (Med-DDPM's ``--sampler dpmpp`` / ``unipc``); kept with the schedulers because nothing in it
knows Med-DDPM: any bundle with an epsilon- or v-prediction DDPM schedule can sample with it.
"""

from __future__ import annotations

from typing import Any

import torch

SOLVERS = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
}


class DiffusersSolver:
    """A diffusers multistep solver on a MONAI training schedule.

    Args:
        solver: "dpmsolver++" (DPM-Solver++(2M)) or "unipc" (UniPC, bh2).
        num_train_timesteps, schedule, prediction_type, schedule_kwargs: the training scheduler's settings
            (``monai.networks.schedulers.DDPMScheduler``), whose betas the solver uses.
        clip_sample: clamp each clean-image estimate to [-1, 1] (MONAI's DDIM ``clip_sample``; Med-DDPM samples so).
        solver_kwargs: further arguments of the diffusers class (e.g. ``solver_order``).
    """

    def __init__(
        self,
        solver: str = "dpmsolver++",
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        schedule_kwargs: dict | None = None,
        clip_sample: bool = False,
        **solver_kwargs: Any,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver {solver!r}: one of {', '.join(SOLVERS)}")
        try:
            import diffusers
        except ImportError:
            raise ImportError(
                f"the {solver} sampler needs the diffusers package: pip install diffusers (or choose another sampler)"
            ) from None
        from monai.networks.schedulers import DDPMScheduler

        training = DDPMScheduler(
            num_train_timesteps, schedule=schedule, prediction_type=prediction_type, **(schedule_kwargs or {})
        )
        class_name, defaults = SOLVERS[solver]
        if clip_sample:  # the clean-image estimate clamped to [-1, 1], as MONAI's DDIM clip_sample does:
            # diffusers' thresholding with ratio 1 and maximum 1 is exactly that clamp
            defaults = {**defaults, "thresholding": True, "dynamic_thresholding_ratio": 1.0, "sample_max_value": 1.0}
        self.solver = getattr(diffusers, class_name)(
            num_train_timesteps=num_train_timesteps,
            trained_betas=training.betas.double().tolist(),
            prediction_type=prediction_type,
            **{**defaults, **solver_kwargs},
        )
        self.name = solver
        self.num_train_timesteps = int(num_train_timesteps)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``device`` is accepted for MONAI's interface and ignored: the timesteps stay on the CPU, because MONAI's
        ``DiffusionInferer.sample`` concatenates them with a CPU tensor (a CUDA copy fails on the next volume), and
        each step receives its timestep as a number anyway."""
        if not 1 <= int(num_inference_steps) <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}"
            )
        self.solver.set_timesteps(int(num_inference_steps), device="cpu")
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = self.solver.timesteps.long()

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        """One solver step; calls must follow ``timesteps`` in order (the solver keeps its previous outputs).

        The arithmetic is float32 whatever the network's output dtype: diffusers casts each step's result to the
        model output's dtype, which under bf16 autocast would carry the whole trajectory in bf16."""
        t = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        if t == int(self.timesteps[0]):  # a new trajectory: forget the previous one's history
            self.set_timesteps(self.num_inference_steps or len(self.timesteps))
        prev = self.solver.step(model_output.float(), t, sample.float(), return_dict=False)[0]
        return prev, None

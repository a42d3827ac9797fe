"""Noise schedules, samplers and training targets MONAI lacks: ddim (DDIM whose every step uses the true previous
timestep, with an x0 hook; all bundles), cosine (MONAI's cosine schedule computed in float64, as Med-DDPM's authors
compute it) and sigmoid (D3M's sigmoid alpha-bar schedule), both registered in MONAI's NoiseSchedules and kept with
the schedulers so any bundle's config can name them; and targets (the loss target that follows a scheduler's
prediction_type). Not here: sampling loops of one paper.
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

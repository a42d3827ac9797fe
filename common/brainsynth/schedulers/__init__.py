"""Noise schedules, samplers and training targets MONAI lacks: ddim (DDIM whose every step uses the true previous
timestep, with an x0 hook; all bundles), sigmoid (D3M's sigmoid alpha-bar schedule, registered in MONAI's
NoiseSchedules; kept with the schedulers so any bundle's config can name it) and targets (the loss target that
follows a scheduler's prediction_type). Not here: sampling loops of one paper.
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

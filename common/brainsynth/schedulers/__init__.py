"""Noise schedules and samplers MONAI lacks: ddim (DDIM whose every step uses the true previous timestep, with an
x0 hook; all bundles) and sigmoid (D3M's sigmoid alpha-bar schedule, registered in MONAI's NoiseSchedules; kept
with the schedulers so any bundle's config can name it). Not here: sampling loops of one paper.
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

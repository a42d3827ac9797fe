"""The physics-based simulated BraTS-like cohort.

``simulate_subject`` makes one subject in memory (images, labels, brain mask and the tissue fractions behind
them); ``generate_cohort`` writes a cohort in a BraTS 2023, BraTS 2021 or MSD Task01 layout with a
``datalist.json``; ``python -m brainsynth.cohort --out DIR --subjects N --seed S`` does the same from a shell.

Modules: anatomy (template, grid, transforms), pathology (healthy / glioblastoma / sclerosis / dementia models),
physics (signal equations, noise), simulate (one subject), layout (files, datalist, CLI).
"""

from brainsynth.cohort.anatomy import Grid, make_grid
from brainsynth.cohort.layout import CohortError, generate_cohort, subject_files, subject_id, subject_regions
from brainsynth.cohort.simulate import SimulatedSubject, simulate_subject

__all__ = [
    "CohortError",
    "Grid",
    "SimulatedSubject",
    "generate_cohort",
    "make_grid",
    "simulate_subject",
    "subject_files",
    "subject_id",
    "subject_regions",
]

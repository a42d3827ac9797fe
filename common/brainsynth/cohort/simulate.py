"""One simulated subject: anatomy -> pathology -> tissue fractions -> MR contrasts, labels and brain mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from brainsynth.cohort.anatomy import (
    Grid,
    SplineField,
    brain_box,
    make_grid,
    random_transform,
    sample_template,
    template_for_spacing,
)
from brainsynth.cohort.pathology import PATHOLOGY_MODELS, smooth_noise
from brainsynth.cohort.physics import TISSUE_PROPERTIES, intensity_scale, rician, tissue_signal
from brainsynth.conventions import LABEL_VALUES, LABELS, MODALITIES, canonical_modality, canonical_pathology

#: tissue classes a subject's fractions may hold (healthy ones always; the rest when the pathology makes them)
TISSUE_CLASSES: tuple[str, ...] = tuple(TISSUE_PROPERTIES)
#: pathological tissue -> canonical label; "enhancing lesion" voxels are lesion tissue with gadolinium
TISSUE_LABELS: dict[str, int] = {
    "necrosis": LABEL_VALUES["necrotic_core"],
    "edema": LABEL_VALUES["edema"],
    "enhancing": LABEL_VALUES["enhancing"],
    "lesion": LABEL_VALUES["lesion"],
}
#: standard deviation of the multiplicative tissue texture
TEXTURE_AMPLITUDE = 0.04
#: share of a voxel one healthy tissue must fill for the voxel to count in that tissue's ground-truth region
PURE_TISSUE_FRACTION = 0.8
#: a voxel is brain when its tissue fractions sum to at least this
BRAIN_FRACTION_THRESHOLD = 0.5


@dataclass
class SimulatedSubject:
    """Arrays on ``grid`` (RAS, ``grid.affine``): images float32 (0 outside the brain), canonical labels uint8,
    brain mask uint8, and the ground-truth tissue fractions (float32, partial volume) the images were made from."""

    pathology: str
    grid: Grid
    images: dict[str, np.ndarray]
    labels: np.ndarray
    brain_mask: np.ndarray
    fractions: dict[str, np.ndarray]
    parameters: dict = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.grid.affine

    def regions(self, purity: float = PURE_TISSUE_FRACTION) -> dict[str, np.ndarray]:
        """Ground-truth regions (boolean masks): "wm", "gm", "csf" where that healthy tissue fills at least
        ``purity`` of an unlabelled brain voxel, and every canonical label present ("edema", "lesion", ...)."""
        unlabelled = (self.brain_mask > 0) & (self.labels == 0)
        out = {t: unlabelled & (self.fractions[t] >= purity) for t in ("wm", "gm", "csf")}
        for value in np.unique(self.labels):
            if value:
                out[LABELS[int(value)]] = self.labels == value
        return out

    def region_means(self, purity: float = PURE_TISSUE_FRACTION) -> dict[str, dict[str, float]]:
        """Mean intensity of every contrast in every non-empty region: {region: {modality: mean}}."""
        return {
            name: {m: float(image[mask].mean()) for m, image in self.images.items()}
            for name, mask in self.regions(purity).items()
            if mask.any()
        }

    def tissue_map(self) -> np.ndarray:
        """Dominant healthy tissue per voxel: 0 background, 1 CSF, 2 grey matter, 3 white matter (uint8)."""
        stack = np.stack([self.fractions[k] for k in ("csf", "gm", "wm")])
        out = (np.argmax(stack, axis=0) + 1).astype(np.uint8)
        out[self.brain_mask == 0] = 0
        return out


def _seed_sequence(seed: int | Sequence[int] | np.random.SeedSequence) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    entropy = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    if any(s < 0 for s in entropy):
        raise ValueError(f"seed must be non-negative, got {seed!r}")
    return np.random.SeedSequence(entropy)


def _labels(fractions: dict[str, np.ndarray], total: np.ndarray) -> np.ndarray:
    """Canonical label of each voxel: a pathological tissue that fills at least half of the voxel's brain; the
    tumour core (necrosis + enhancing) takes precedence over edema, and is split by its larger part."""
    labels = np.zeros(total.shape, np.uint8)
    half = 0.5 * total
    for name in ("lesion", "edema"):
        if name in fractions:
            labels[fractions[name] >= half] = TISSUE_LABELS[name]
    if "necrosis" in fractions:
        necrosis, enhancing = fractions["necrosis"], fractions["enhancing"]
        core = (necrosis + enhancing) >= half
        labels[core & (necrosis >= enhancing)] = TISSUE_LABELS["necrosis"]
        labels[core & (necrosis < enhancing)] = TISSUE_LABELS["enhancing"]
    labels[total < BRAIN_FRACTION_THRESHOLD] = 0
    return labels


def simulate_subject(
    pathology: str = "healthy",
    seed: int | Sequence[int] = 0,
    grid: Grid | None = None,
    spacing: float | Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    modalities: Iterable[str] = MODALITIES,
) -> SimulatedSubject:
    """Simulate one subject of ``pathology`` (healthy, glioblastoma, sclerosis, dementia or a synonym).

    The seed fixes everything. Anatomy, acquisition and pathology draw from separate streams, so the same seed
    with another pathology gives the same brain, scanner and noise level with a different disease.
    ``grid`` (or ``spacing`` / ``shape``, see ``make_grid``) defaults to the BraTS grid.
    """
    pathology = canonical_pathology(pathology)
    modalities = [canonical_modality(m) for m in modalities]
    grid = grid or make_grid(spacing, shape)
    anatomy_rng, pathology_rng, scanner_rng, noise_rng = (
        np.random.default_rng(s) for s in _seed_sequence(seed).spawn(4)
    )

    # --- anatomy: a random near-affine transform of the template ---------------------------------------------
    elastic_std = float(anatomy_rng.uniform(1.5, 3.5))
    transform = random_transform(
        anatomy_rng, grid, elastic_std=elastic_std, rotation_deg=3.0, scale_std=0.05, shift_std=2.0
    )
    properties = {
        name: (
            t1 * np.exp(anatomy_rng.normal(0, 0.05)),
            t2 * np.exp(anatomy_rng.normal(0, 0.05)),
            pd * np.exp(anatomy_rng.normal(0, 0.03)),
        )
        for name, (t1, t2, pd) in TISSUE_PROPERTIES.items()
    }
    texture_rng = np.random.default_rng(anatomy_rng.integers(2**62))
    model = PATHOLOGY_MODELS[pathology](pathology_rng, transform, grid)

    box = brain_box(grid, transform)
    axes = [a[s] for a, s in zip(grid.axes(), box)]
    probe = max(1, int(round(4.0 / min(grid.spacing))))
    fractions = sample_template(template_for_spacing(tuple(grid.spacing)), transform.on_axes(axes), probe)
    gd = model.apply(fractions, axes, grid, transform)
    total = sum(fractions.values())
    inside = total >= BRAIN_FRACTION_THRESHOLD
    labels = _labels(fractions, total)

    # --- acquisition: per-contrast scanner gain, bias field and Rician noise ---------------------------------
    noise_level = float(scanner_rng.uniform(0.015, 0.05))  # noise sd as a share of full scale (1000)
    bias_std = float(scanner_rng.uniform(0.03, 0.12))  # sd of the log bias field
    lo, hi = [a[0] for a in grid.axes()], [a[-1] for a in grid.axes()]
    bias = SplineField.random(scanner_rng, lo, hi, lattice_spacing=90.0, std=bias_std, channels=len(MODALITIES))
    gains = {m: float(scanner_rng.uniform(0.9, 1.1)) for m in MODALITIES}
    # noise and texture are drawn for a 1 mm acquisition; a coarser grid averages them like voxels do
    averaging = np.float32(1.0 / np.sqrt(max(float(np.prod(grid.spacing)), 1.0)))
    noise_sd = {
        m: noise_level * float(scanner_rng.uniform(0.8, 1.25)) * 1000.0 * gains[m] * averaging for m in MODALITIES
    }

    # the signal is only needed inside the brain: work on those voxels as 1-D arrays
    where = np.flatnonzero(inside)
    at_brain = {name: f.ravel()[where] for name, f in fractions.items()}
    gd_at_brain = {name: g.ravel()[where] for name, g in gd.items()}
    # fine tissue heterogeneity the smooth template lacks: a few percent, correlated over ~1 mm
    texture = smooth_noise(texture_rng, total.shape, [1.0 / s for s in grid.spacing]).ravel()[where]
    texture = 1.0 + np.float32(TEXTURE_AMPLITUDE) * averaging * texture
    bias_fields = bias.on_axes(axes)

    images = {}
    for m in modalities:
        signal = np.zeros(where.shape, np.float32)
        for name, fraction in at_brain.items():
            signal += fraction * tissue_signal(m, properties[name], gd_at_brain.get(name, 0.0))
        signal *= np.exp(bias_fields[MODALITIES.index(m)].ravel()[where]) * texture
        signal *= np.float32(intensity_scale(m) * gains[m])
        values = np.zeros(total.size, np.float32)
        values[where] = rician(signal, noise_sd[m], noise_rng)
        image = np.zeros(grid.shape, np.float32)
        image[box] = values.reshape(total.shape)
        images[m] = image

    def full(array, dtype):
        out = np.zeros(grid.shape, dtype)
        out[box] = array
        return out

    parameters = {
        "pathology": pathology,
        "elastic_sd_mm": round(elastic_std, 3),
        "noise_sd": {m: round(v, 3) for m, v in noise_sd.items()},
        "linear": [[round(float(v), 4) for v in row] for row in transform.linear],
        "shift_mm": [round(float(v), 3) for v in transform.shift],
        "noise_sd_of_full_scale": noise_level,
        "log_bias_sd": bias_std,
        "gains": gains,
        **model.parameters,
    }
    return SimulatedSubject(
        pathology=pathology,
        grid=grid,
        images=images,
        labels=full(labels, np.uint8),
        brain_mask=full(inside, np.uint8),
        fractions={k: full(v, np.float32) for k, v in fractions.items()},
        parameters=parameters,
    )

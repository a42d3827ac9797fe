"""Pathology models of the simulated cohort: healthy, glioblastoma, multiple sclerosis, dementia.

Each model draws its parameters from the subject's pathology random stream when it is made (adding any local
deformation - tumour mass effect, ventricular enlargement - to the subject transform), then ``apply`` edits the
tissue fractions sampled on the output grid in place: pathological tissues replace healthy ones voxel by voxel,
so fractions keep summing to the brain fraction and partial volume carries over to the signal.

Shapes are soft indicators of signed distances, ``clip(0.5 - d / h, 0, 1)`` with ``h`` the voxel size, which is
about the fraction of a voxel a smooth boundary at distance ``d`` covers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from brainsynth.cohort.anatomy import (
    Grid,
    Inflation,
    SubjectTransform,
    Swelling,
    sample_template,
    template_for_spacing,
    template_landmarks,
)

#: the fine lattice on which tumour shape and edema growth are computed, whatever the output spacing (mm), so
#: a seed gives the same tumour at every resolution
TUMOUR_LATTICE_MM = 2.0
#: share of a grey-matter voxel that edema / lesion tissue replaces (white matter is replaced fully)
GREY_MATTER_INVOLVEMENT = {"edema": 0.6, "lesion": 0.5}


def soft_indicator(distance_mm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Share of a voxel inside a boundary at signed distance ``distance_mm`` (negative inside)."""
    return np.clip(0.5 - distance_mm / np.float32(voxel_mm), 0.0, 1.0).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_vox``."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _replace(fractions: dict[str, np.ndarray], name: str, share: np.ndarray, box=...) -> None:
    """Turn ``share`` (0..1 per voxel) of the white matter and the tissue-specific part of the grey matter into
    ``name`` (edema or lesion tissue)."""
    wm, gm = fractions["wm"][box], fractions["gm"][box]
    grey = np.float32(GREY_MATTER_INVOLVEMENT[name]) * share
    fractions[name][box] += share * wm + grey * gm
    wm *= 1.0 - share
    gm *= 1.0 - grey


#: edema ends where the spread has fallen to this share of its value at the tumour (about 2.5 decay lengths)
EDEMA_THRESHOLD = 0.08


def _smooth3(field: np.ndarray) -> np.ndarray:
    """[1/4, 1/2, 1/4] along each axis, zero outside (slicing, several times faster than convolve1d here)."""
    for axis in range(field.ndim):
        out = field * np.float32(0.5)
        lo = [slice(None)] * field.ndim
        hi = [slice(None)] * field.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(hi)] += np.float32(0.25) * field[tuple(lo)]
        out[tuple(lo)] += np.float32(0.25) * field[tuple(hi)]
        field = out
    return field


def _spread_steps(
    source: np.ndarray,
    wm: np.ndarray,
    gm: np.ndarray,
    length: float,
    h: float,
    steps: int,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Iterate ``e = max(source, damping * smooth(e))``; the damping gives a steady state that falls off like
    exp(-distance / l) with l = ``length`` in white matter, 0.3 l in grey matter and nearly 0 in CSF."""
    local = np.float32(length) * np.clip(wm + 0.3 * gm, 0.05, 1.0)
    damping = (2.0 / (1.0 + np.cosh(np.float32(h) / local))).astype(np.float32)
    spread = source.astype(np.float32) if start is None else np.maximum(start, source)
    for _ in range(steps):
        spread = np.maximum(_smooth3(spread) * damping, source)
    return spread


def _edema_spread(core: np.ndarray, wm: np.ndarray, gm: np.ndarray, length: float, h: float) -> np.ndarray:
    """Edema region: where a damped spread from the tumour core, preferring white matter, stays above
    EDEMA_THRESHOLD. Solved coarse (2 h, to convergence) then refined at h, so it costs well under a second."""
    pad = [(0, n % 2) for n in core.shape]

    def halve(a, reduce):
        a = np.pad(a, pad)
        return reduce(a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2), axis=(1, 3, 5))

    source = core.astype(np.float32)
    coarse = _spread_steps(
        halve(source, np.max),
        halve(wm, np.mean),
        halve(gm, np.mean),
        length,
        2 * h,
        steps=int(4 * (length / (2 * h)) ** 2) + 10,
    )
    start = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: core.shape[0], : core.shape[1], : core.shape[2]]
    fine = _spread_steps(source, wm, gm, length, h, steps=20, start=ndi.uniform_filter(start, 2))
    return fine > EDEMA_THRESHOLD


class Healthy:
    """No pathology; the base of the other models."""

    name = "healthy"

    def __init__(self, rng: np.random.Generator, transform: SubjectTransform, grid: Grid):
        self.parameters: dict = {}

    def apply(
        self, fractions: dict[str, np.ndarray], axes: list[np.ndarray], grid: Grid, transform: SubjectTransform
    ) -> dict[str, np.ndarray | float]:
        """Edit ``fractions`` in place; return gadolinium concentration (mM) per tissue where it is non-zero."""
        return {}


class Dementia(Healthy):
    """Atrophy: enlarged lateral ventricles (their walls pushed out by a few mm) and sulcal widening with
    cortical thinning (grey matter that borders CSF partly becomes CSF)."""

    name = "dementia"

    def __init__(self, rng, transform, grid):
        growth = float(rng.uniform(2.0, 4.0))  # mm the ventricle walls move out
        transform.inflations.append(Inflation(template_landmarks().ventricle_inflation, growth))
        self.cortical_loss = float(rng.uniform(0.3, 0.55))
        self.parameters = {
            "ventricle_growth_mm": round(growth, 3),
            "cortical_grey_matter_loss": round(self.cortical_loss, 3),
        }

    def apply(self, fractions, axes, grid, transform):
        gm, csf = fractions["gm"], fractions["csf"]
        total = fractions["wm"] + gm + csf
        # exposure: how much CSF or outside-brain surrounds a voxel within ~1.5 mm
        exposure = ndi.gaussian_filter(csf + (1.0 - total), [1.5 / s for s in grid.spacing], output=np.float32)
        loss = np.float32(self.cortical_loss) * gm * np.clip(2.0 * exposure, 0.0, 1.0)
        gm -= loss
        csf += loss
        return {}


class Sclerosis(Healthy):
    """Several small white-matter lesions: periventricular (ovoid, long axis pointing away from the ventricle,
    like Dawson's fingers), juxtacortical and deep; about one in five enhances (active lesion)."""

    name = "sclerosis"
    SITE_PROBABILITIES = {"periventricular": 0.55, "juxtacortical": 0.3, "deep": 0.15}

    def __init__(self, rng, transform, grid):
        landmarks = template_landmarks()
        sites = {
            "periventricular": landmarks.periventricular_sites,
            "juxtacortical": landmarks.juxtacortical_sites,
            "deep": landmarks.deep_wm_sites,
        }
        count = int(rng.integers(8, 26))
        kinds = rng.choice(list(self.SITE_PROBABILITIES), size=count, p=list(self.SITE_PROBABILITIES.values()))
        self.lesions = []
        for kind in kinds:
            where = sites[kind][rng.integers(len(sites[kind]))] + rng.uniform(-1.0, 1.0, 3)
            centre = transform.inverse_points(where)[0]
            radius = float(np.exp(rng.uniform(np.log(2.0), np.log(7.0))))
            if kind == "periventricular":
                nearest = landmarks.ventricle_centres[
                    np.argmin(np.linalg.norm(landmarks.ventricle_centres - where, axis=1))
                ]
                direction = where - nearest
                first = direction / max(np.linalg.norm(direction), 1e-6)
                basis = np.linalg.qr(np.column_stack([first, rng.standard_normal((3, 2))]))[0]
                elongation = rng.uniform(1.5, 2.5)
            else:
                basis, elongation = random_rotation(rng), rng.uniform(1.0, 1.5)
            semi_axes = radius * np.array([elongation, 1.0, 1.0]) / elongation ** (1 / 3)  # same volume
            gd = float(rng.uniform(0.1, 0.3)) if rng.random() < 0.2 else 0.0
            self.lesions.append(
                {"kind": str(kind), "centre": centre, "basis": basis, "semi_axes": semi_axes, "gd_mm": gd}
            )
        self.parameters = {
            "lesions": [
                {
                    "kind": l["kind"],
                    "centre_mm": [round(float(v), 2) for v in l["centre"]],
                    "semi_axes_mm": [round(float(v), 2) for v in l["semi_axes"]],
                    "gd_mm": round(l["gd_mm"], 3),
                }
                for l in self.lesions
            ]
        }

    def apply(self, fractions, axes, grid, transform):
        voxel = float(np.mean(grid.spacing))
        share = np.zeros_like(fractions["wm"])
        gd = np.zeros_like(fractions["wm"])
        for lesion in self.lesions:
            reach = lesion["semi_axes"].max() + 2 * voxel
            box = []
            for a, c in zip(axes, lesion["centre"]):
                sel = np.nonzero(np.abs(a - c) <= reach)[0]
                box.append(slice(int(sel[0]), int(sel[-1]) + 1) if sel.size else slice(0, 0))
            if any(s.stop <= s.start for s in box):
                continue
            rel = np.stack(
                np.meshgrid(*[a[s] - c for a, s, c in zip(axes, box, lesion["centre"])], indexing="ij"), axis=-1
            )
            local = rel @ lesion["basis"]  # coordinates along the lesion's own axes
            rho = np.sqrt(((local / lesion["semi_axes"]) ** 2).sum(-1))
            ind = soft_indicator(lesion["semi_axes"].mean() * (rho - 1.0), voxel)
            box = tuple(box)
            share[box] = np.maximum(share[box], ind)
            if lesion["gd_mm"] > 0:
                gd[box] = np.where(ind > 0, np.maximum(gd[box], lesion["gd_mm"]), gd[box])
        fractions["lesion"] = np.zeros_like(share)
        _replace(fractions, "lesion", share)
        return {"lesion": gd} if gd.any() else {}


class Glioblastoma(Healthy):
    """An irregular tumour in hemispheric white matter: necrotic core, enhancing rim of uneven thickness and
    uptake, vasogenic edema that spreads along white matter (grey matter resists, CSF stops it), and mass effect
    (a swelling that pushes the neighbouring anatomy, ventricles included, away)."""

    name = "glioblastoma"

    def __init__(self, rng, transform, grid):
        landmarks = template_landmarks()
        where = landmarks.tumour_sites[rng.integers(len(landmarks.tumour_sites))] + rng.uniform(-1.0, 1.0, 3)
        self.centre = transform.inverse_points(where)[0]
        self.radius = float(rng.uniform(13.0, 26.0))
        self.semi_axes = self.radius * np.exp(rng.normal(0.0, 0.15, 3))
        self.basis = random_rotation(rng)
        self.roughness = float(rng.uniform(0.12, 0.25))
        # up to two daughter lobes bulging from the main mass (multilobulated tumours)
        self.lobes = []
        for _ in range(int(rng.integers(0, 3))):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            self.lobes.append((direction * self.radius * rng.uniform(0.5, 0.9), self.radius * rng.uniform(0.4, 0.7)))
        self.necrosis = float(rng.uniform(0.45, 0.75)) if rng.random() > 0.1 else 0.0
        self.gd_mm = float(rng.uniform(0.2, 0.5))
        self.edema_length = float(rng.uniform(6.0, 15.0))  # decay length of edema spread in white matter, mm
        self.mass_effect = float(rng.uniform(0.3, 0.6))
        self.noise_seed = int(rng.integers(2**62))
        transform.swellings.append(Swelling(self.centre, np.full(3, self.radius), self.mass_effect))
        self.parameters = {
            "centre_mm": [round(float(v), 2) for v in self.centre],
            "semi_axes_mm": [round(float(v), 2) for v in self.semi_axes],
            "necrotic_fraction_of_radius": round(self.necrosis, 3),
            "gd_mm": round(self.gd_mm, 3),
            "lobes": len(self.lobes),
            "edema_length_mm": round(self.edema_length, 2),
            "mass_effect": round(self.mass_effect, 3),
        }

    def _lattice_fields(self, transform: SubjectTransform) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Signed distances (mm, negative inside) of core, necrosis and edema, and the gadolinium map, on a
        2 mm lattice around the tumour in output space."""
        h = TUMOUR_LATTICE_MM
        extent = max([self.semi_axes.max()] + [np.linalg.norm(offset) + r for offset, r in self.lobes])
        half = extent * (1.0 + 2 * self.roughness) + 2.5 * self.edema_length + 3 * h
        axes = [c + np.arange(-half, half + h / 2, h) for c in self.centre]
        shape = tuple(len(a) for a in axes)
        anatomy = sample_template(template_for_spacing((h, h, h)), transform.on_axes(axes))
        rng = np.random.default_rng(self.noise_seed)
        n_shape, n_detail, n_necrosis, n_uptake = (
            smooth_noise(rng, shape, s * self.radius / h) for s in (0.4, 0.15, 0.25, 0.2)
        )
        rel = np.stack(np.meshgrid(*[a - c for a, c in zip(axes, self.centre)], indexing="ij"), axis=-1)
        # normalised radius: 1 on the smooth outline of the main ellipsoid or of a lobe, whichever is nearer
        rho = np.sqrt((((rel @ self.basis) / self.semi_axes) ** 2).sum(-1))
        for offset, radius in self.lobes:
            rho = np.minimum(rho, np.sqrt(((rel - offset) ** 2).sum(-1)) / radius)
        rho = rho.astype(np.float32)
        brain = (anatomy["wm"] + anatomy["gm"] + anatomy["csf"]) > 0.3
        wobble = self.roughness * (n_shape + 0.4 * n_detail)
        d_core = np.float32(self.radius) * (rho - 1.0 + wobble)
        d_core[~brain] = np.maximum(d_core[~brain], h)
        if self.necrosis > 0:
            d_necrosis = np.float32(self.radius) * (rho - self.necrosis + 0.8 * wobble + 0.12 * n_necrosis)
        else:
            d_necrosis = np.full(shape, 1e3, np.float32)
        core = d_core < 0
        edema = _edema_spread(core, anatomy["wm"], anatomy["gm"], self.edema_length, h) & ~core & brain
        d_edema = (ndi.distance_transform_edt(~edema) - ndi.distance_transform_edt(edema)).astype(np.float32) * h
        d_edema[edema] += h / 2
        d_edema[~edema] -= h / 2
        gd = np.float32(self.gd_mm) * np.clip(1.0 + 0.45 * n_uptake, 0.2, 1.8)
        return axes, {"core": d_core, "necrosis": d_necrosis, "edema": d_edema, "gd": gd.astype(np.float32)}

    def apply(self, fractions, axes, grid, transform):
        lattice_axes, fields = self._lattice_fields(transform)
        h = TUMOUR_LATTICE_MM
        box, positions = [], []
        for a, l in zip(axes, lattice_axes):
            sel = np.nonzero((a >= l[0]) & (a <= l[-1]))[0]
            if sel.size == 0:
                return {}
            box.append(slice(int(sel[0]), int(sel[-1]) + 1))
            positions.append((a[sel] - l[0]) / h)
        box = tuple(box)
        shape = tuple(len(p) for p in positions)
        # the output crop is an axis-aligned sub-grid of the lattice's space: a diagonal resampling
        step = [float(p[1] - p[0]) if len(p) > 1 else 1.0 for p in positions]
        start = [float(p[0]) for p in positions]

        def resample(field, fill):
            return (
                ndi.affine_transform(
                    field, step, offset=start, output_shape=shape, order=1, mode="nearest", output=np.float32
                )
                if field is not None
                else fill
            )

        voxel = float(np.mean(grid.spacing))
        core_share = soft_indicator(resample(fields["core"], None), voxel)
        necrotic_share = soft_indicator(resample(fields["necrosis"], None), voxel)
        edema_share = soft_indicator(resample(fields["edema"], None), voxel) * (1.0 - core_share)
        for name in ("necrosis", "enhancing", "edema"):
            fractions[name] = np.zeros_like(fractions["wm"])
        total = fractions["wm"][box] + fractions["gm"][box] + fractions["csf"][box]
        for name in ("wm", "gm", "csf"):
            fractions[name][box] *= 1.0 - core_share
        fractions["necrosis"][box] = total * core_share * necrotic_share
        fractions["enhancing"][box] = total * core_share * (1.0 - necrotic_share)
        _replace(fractions, "edema", edema_share, box)
        gd = np.zeros_like(fractions["wm"])
        gd[box] = resample(fields["gd"], None)
        return {"enhancing": gd}


PATHOLOGY_MODELS = {model.name: model for model in (Healthy, Glioblastoma, Sclerosis, Dementia)}

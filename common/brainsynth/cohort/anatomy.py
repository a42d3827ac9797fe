"""Anatomy of the simulated cohort: the MNI ICBM152 2009 template, the output grid and smooth random transforms.

The template ships inside nilearn (no download): a 1 mm, 197 x 233 x 189 skull-stripped brain with grey- and
white-matter probability maps; CSF is the brain mask minus grey and white matter. Everything spatial is in
world millimetres (RAS): the output grid's world coordinates are MNI coordinates up to the subject's own random
transform, so a subject transform maps output millimetres to template millimetres.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

TEMPLATE_NAME = "MNI ICBM152 2009 nonlinear symmetric, 1 mm (shipped with nilearn)"
#: the BraTS grid: 240 x 240 x 155 voxels of 1 mm
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
BRATS_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)
#: MNI point placed at the centre of the output grid: the middle of the template brain's bounding box, raised
#: 3 mm so that a larger-than-average subject loses brainstem rather than vertex at the 155 mm field of view
GRID_CENTRE_MNI: tuple[float, float, float] = (0.0, -17.0, 8.0)
#: templates are kept in float32, one copy per process
TISSUES = ("wm", "gm", "csf")


# --- output grid --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """An axis-aligned RAS voxel grid: ``world = origin + spacing * index`` per axis."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def axes(self) -> list[np.ndarray]:
        """World coordinate (mm) of the voxel centres along each axis."""
        return [np.float64(o) + np.float64(s) * np.arange(n) for o, s, n in zip(self.origin, self.spacing, self.shape)]

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": [float(s) for s in self.spacing],
            "affine": [[float(v) for v in row] for row in self.affine],
            "orientation": "RAS",
            "space": "MNI-aligned world millimetres (each subject randomly transformed)",
        }


def _triple(value: float | Sequence[float], name: str, kind: type) -> tuple:
    values = [value] * 3 if np.isscalar(value) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or three, got {value!r}")
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {value!r}") from None
    if any(v <= 0 for v in out) or (kind is int and any(float(v) != float(w) for v, w in zip(out, values))):
        raise ValueError(f"{name} must be positive{' integers' if kind is int else ''}, got {value!r}")
    return out


def make_grid(spacing: float | Sequence[float] | None = None, shape: Sequence[int] | None = None) -> Grid:
    """The output grid, centred on the brain.

    Neither given: the BraTS grid (240 x 240 x 155, 1 mm). ``spacing`` only: the BraTS field of view
    (240 x 240 x 155 mm) at that spacing (3 mm -> 80 x 80 x 52). ``shape`` only: that shape over the BraTS field
    of view. Both: exactly that grid (a small one crops the brain).
    """
    fov = np.multiply(BRATS_SHAPE, BRATS_SPACING)
    if spacing is None and shape is None:
        spacing_t, shape_t = BRATS_SPACING, BRATS_SHAPE
    elif shape is None:
        spacing_t = _triple(spacing, "spacing", float)
        shape_t = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing_t))
    elif spacing is None:
        shape_t = _triple(shape, "shape", int)
        spacing_t = tuple(float(f / n) for f, n in zip(fov, shape_t))
    else:
        spacing_t, shape_t = _triple(spacing, "spacing", float), _triple(shape, "shape", int)
    origin = tuple(float(c - s * (n - 1) / 2.0) for c, s, n in zip(GRID_CENTRE_MNI, spacing_t, shape_t))
    return Grid(tuple(shape_t), tuple(spacing_t), origin)


# --- template ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Template:
    """Tissue fractions on the template's 1 mm grid (float32, summing to the brain fraction <= 1)."""

    maps: dict[str, np.ndarray]
    affine: np.ndarray

    @functools.cached_property
    def total(self) -> np.ndarray:
        return sum(self.maps.values())

    def mm_to_index(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world mm -> (..., 3) voxel index (the template affine is diagonal)."""
        return (np.asarray(points) - self.affine[:3, 3]) / np.diag(self.affine)[:3]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """The MNI ICBM152 2009 tissue maps from nilearn, loaded once per process."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj, dtype=np.float32)
    # a little grey / white matter lies just outside the binary mask: count it as brain, not as negative CSF
    total = np.maximum(mask, np.minimum(gm + wm, 1.0))
    excess = np.maximum(gm + wm - total, 0.0)
    scale = np.where(excess > 0, total / np.maximum(gm + wm, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(total - gm - wm, 0.0, 1.0)
    affine = np.asarray(gm_img.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])):
        raise RuntimeError("nilearn's MNI template is expected to have a diagonal affine")
    # a zero border of one voxel (the brainstem reaches the template's lowest slice)
    affine[:3, 3] -= np.diag(affine)[:3]
    maps = {"wm": wm, "gm": gm, "csf": csf.astype(np.float32)}
    return Template({k: np.pad(v, 1) for k, v in maps.items()}, affine)


@functools.lru_cache(maxsize=4)
def template_for_spacing(spacing: tuple[float, float, float]) -> Template:
    """The template low-pass filtered for sampling at ``spacing`` mm, so coarse grids get partial volume rather
    than aliasing (Gaussian with FWHM ~ the voxel size, minus the template's own 1 mm)."""
    template = load_template()
    sigma = [0.42 * np.sqrt(max(s * s - 1.0, 0.0)) for s in spacing]
    if max(sigma) < 0.2:
        return template
    return Template(
        {k: ndi.gaussian_filter(v, sigma, output=np.float32) for k, v in template.maps.items()}, template.affine
    )


@dataclass(frozen=True)
class Landmarks:
    """Template places the pathologies start from (MNI mm)."""

    ventricle_centres: np.ndarray  # (2, 3) left and right lateral ventricle centroids
    ventricle_extent: np.ndarray  # (3,) half-extent (std) of one lateral ventricle, mm
    ventricle_inflation: "TemplateField"  # unit pull towards the lateral ventricles (see Inflation)
    tumour_sites: np.ndarray  # (N, 3) deep hemispheric white matter
    periventricular_sites: np.ndarray  # (N, 3) white matter touching the lateral ventricles
    juxtacortical_sites: np.ndarray  # (N, 3) white matter at the grey-white junction
    deep_wm_sites: np.ndarray  # (N, 3) core white matter


@functools.lru_cache(maxsize=1)
def template_landmarks() -> Landmarks:
    """Candidate sites computed once on a 2 mm block-average of the template."""
    template = load_template()
    pad = [(0, n % 2) for n in template.maps["wm"].shape]
    small = {}
    for key, vol in template.maps.items():
        v = np.pad(vol, pad)
        small[key] = v.reshape(v.shape[0] // 2, 2, v.shape[1] // 2, 2, v.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    wm, gm, csf = small["wm"], small["gm"], small["csf"]
    index = np.stack(np.meshgrid(*[np.arange(n) * 2 + 0.5 for n in wm.shape], indexing="ij"), axis=-1)
    mm = index * np.diag(template.affine)[:3] + template.affine[:3, 3]
    x, y, z = mm[..., 0], mm[..., 1], mm[..., 2]
    depth = ndi.distance_transform_edt((wm + gm + csf) > 0.5) * 2.0  # mm from the brain surface
    cerebrum = (z > -25) & ~((y < -40) & (z < 0))
    # lateral ventricles: deep CSF away from the midline, above the temporal horns
    ventricles = (
        (csf > 0.6) & (depth > 12) & (np.abs(x) > 1) & (np.abs(x) < 36) & (y > -60) & (y < 32) & (z > -5) & (z < 30)
    )
    centres = np.stack([mm[ventricles & (x < 0)].mean(0), mm[ventricles & (x > 0)].mean(0)])
    extent = mm[ventricles & (x > 0)].std(0)
    to_ventricle = ndi.distance_transform_edt(~ventricles) * 2.0
    # the gradient of the smoothed ventricle mask, scaled to unit length at its strongest: it points into
    # the ventricles from their surroundings and fades over ~1 cm
    smooth = ndi.gaussian_filter(ventricles.astype(np.float32), INFLATION_SMOOTHING_MM / 2.0)
    gradient = np.stack(np.gradient(smooth, 2.0))
    gradient /= np.linalg.norm(gradient, axis=0).max()
    inflation = TemplateField(gradient.astype(np.float32), origin=mm[0, 0, 0], spacing=2.0)
    to_cortex = ndi.distance_transform_edt(gm < 0.5) * 2.0
    return Landmarks(
        ventricle_centres=centres,
        ventricle_extent=extent,
        ventricle_inflation=inflation,
        tumour_sites=mm[(wm > 0.6) & (depth > 18) & cerebrum & (np.abs(x) > 8)],
        periventricular_sites=mm[(wm > 0.5) & (to_ventricle > 1) & (to_ventricle <= 6) & cerebrum],
        juxtacortical_sites=mm[
            (wm > 0.4) & (to_cortex > 0) & (to_cortex <= 3) & (depth > 5) & (depth < 22) & cerebrum & (z > -10)
        ],
        deep_wm_sites=mm[(wm > 0.85) & cerebrum & (z > -10)],
    )


#: width (mm) of the Gaussian that turns a template structure into the pull field of its Inflation
INFLATION_SMOOTHING_MM = 5.0


@dataclass(frozen=True, eq=False)
class TemplateField:
    """A vector field on a regular lattice in template mm: ``values`` (3, nx, ny, nz), zero outside."""

    values: np.ndarray
    origin: np.ndarray
    spacing: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Template-mm box outside which the field is zero."""
        support = np.linalg.norm(self.values, axis=0) > 1e-3
        idx = np.argwhere(support)
        return self.origin + idx.min(0) * self.spacing, self.origin + idx.max(0) * self.spacing

    def at(self, coords_mm: np.ndarray) -> np.ndarray:
        """(3, ...) values at (3, ...) template-mm coordinates (trilinear)."""
        index = [(coords_mm[i] - np.float32(self.origin[i])) / np.float32(self.spacing) for i in range(3)]
        return np.stack(
            [ndi.map_coordinates(v, index, order=1, mode="constant", cval=0.0, output=np.float32) for v in self.values]
        )


@dataclass(frozen=True)
class Inflation:
    """Grows a template structure by about ``distance_mm`` along its outward normal: an output point near the
    structure shows the template anatomy from ``distance_mm`` x the structure's pull field nearer to it."""

    field: TemplateField
    distance_mm: float

    def apply(self, coords: np.ndarray) -> None:
        """Shift (3, X, Y, Z) template-mm coordinates in place, only inside the field's support."""
        lo, hi = self.field.bounds()
        inside = np.ones(coords.shape[1:], bool)
        for i in range(3):
            inside &= (coords[i] >= lo[i]) & (coords[i] <= hi[i])
        if not inside.any():
            return
        box = []
        for i in range(3):
            hit = np.nonzero(inside.any(axis=tuple(j for j in range(3) if j != i)))[0]
            box.append(slice(int(hit[0]), int(hit[-1]) + 1))
        local = coords[(slice(None), *box)]
        local += np.float32(self.distance_mm) * self.field.at(local)


# --- smooth random displacement fields --------------------------------------------------------------------------
def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


#: standard deviation of a cubic B-spline field with unit-variance coefficients, per dimension: sqrt(151/315)
_BSPLINE_STD_1D = float(np.sqrt(151.0 / 315.0))


@dataclass(frozen=True)
class SplineField:
    """A smooth random field: cubic B-spline on a regular control lattice, ``channels`` values per point.

    Evaluated separably on grid axes (three small matrix products, no per-voxel interpolation), or at points.
    """

    coefficients: np.ndarray  # (channels, nx, ny, nz)
    lattice_origin: np.ndarray  # (3,) mm of control point 0
    lattice_spacing: float

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        lo: Sequence[float],
        hi: Sequence[float],
        lattice_spacing: float,
        std: float,
        channels: int = 3,
    ) -> "SplineField":
        """A field over the box [lo, hi] (mm) whose values have standard deviation ``std``."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        origin = lo - 1.5 * lattice_spacing
        counts = np.ceil((hi - origin) / lattice_spacing).astype(int) + 2
        coefficients = rng.standard_normal((channels, *counts)) * (std / _BSPLINE_STD_1D**3)
        return cls(coefficients, origin, float(lattice_spacing))

    def _basis(self, coords: np.ndarray, axis: int) -> np.ndarray:
        u = (np.asarray(coords, float) - self.lattice_origin[axis]) / self.lattice_spacing
        return _cubic_bspline(u[:, None] - np.arange(self.coefficients.shape[axis + 1])[None, :])

    def on_axes(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """(channels, len(ax0), len(ax1), len(ax2)) float32 on the grid spanned by three coordinate vectors."""
        bx, by, bz = (self._basis(a, i) for i, a in enumerate(axes))
        c = np.tensordot(self.coefficients, bx, axes=([1], [1]))  # (C, ny, nz, X)
        c = np.tensordot(c, by, axes=([1], [1]))  # (C, nz, X, Y)
        # the one large product last, so its result is already (C, X, Y, Z) in memory order
        return np.tensordot(c.astype(np.float32), bz.astype(np.float32), axes=([1], [1]))

    def at_points(self, points: np.ndarray) -> np.ndarray:
        """(N, channels) at (N, 3) points in mm."""
        points = np.atleast_2d(points)
        bx, by, bz = (self._basis(points[:, i], i) for i in range(3))
        return np.einsum("cabk,na,nb,nk->nc", self.coefficients, bx, by, bz)


@dataclass(frozen=True)
class Swelling:
    """A local radial expansion around ``centre`` (output mm): the output point x shows the subject's anatomy from
    ``x - amplitude * (x - centre) * g(x)``, g a Gaussian of per-axis widths ``widths`` (mm), so the neighbourhood
    of the centre is magnified and its surroundings pushed outwards. Monotone (invertible) for amplitude < 1."""

    centre: np.ndarray
    widths: np.ndarray
    amplitude: float

    def displacement(self, axes: Sequence[np.ndarray]) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """(index box, (3, *box) pull-back displacement in mm) over the grid axes, limited to where it matters."""
        box = []
        for a, c, w in zip(axes, self.centre, self.widths):
            sel = np.nonzero(np.abs(a - c) < 3.7 * w)[0]
            if sel.size == 0:
                return None
            box.append(slice(int(sel[0]), int(sel[-1]) + 1))
        rel = [(a[s] - c).astype(np.float32) for a, s, c in zip(axes, box, self.centre)]
        g = np.exp(
            -0.5
            * (
                (rel[0][:, None, None] / self.widths[0]) ** 2
                + (rel[1][None, :, None] / self.widths[1]) ** 2
                + (rel[2][None, None, :] / self.widths[2]) ** 2
            )
        ).astype(np.float32)
        g *= -self.amplitude
        return tuple(box), np.stack([g * rel[0][:, None, None], g * rel[1][None, :, None], g * rel[2][None, None, :]])


@dataclass
class SubjectTransform:
    """Output mm -> template mm: ``y = centre + linear @ (x - centre) + shift + elastic(x)``, then the
    pathology's swellings (output space) and inflations (template space)."""

    linear: np.ndarray  # (3, 3)
    shift: np.ndarray  # (3,)
    elastic: SplineField
    centre: np.ndarray  # (3,) the point the linear part turns about (grid centre)
    swellings: list[Swelling]
    inflations: list[Inflation] = field(default_factory=list)

    def at_points(self, points: np.ndarray) -> np.ndarray:
        """Template mm of (N, 3) output mm points (without swellings: they are pathology-specific)."""
        points = np.atleast_2d(np.asarray(points, float))
        return self.centre + (points - self.centre) @ self.linear.T + self.shift + self.elastic.at_points(points)

    def inverse_points(self, targets: np.ndarray, iterations: int = 8) -> np.ndarray:
        """Output mm of (N, 3) template mm points (fixed-point iteration; the transform is near-affine)."""
        targets = np.atleast_2d(np.asarray(targets, float))
        inv = np.linalg.inv(self.linear)
        x = self.centre + (targets - self.centre - self.shift) @ inv.T
        for _ in range(iterations):
            x = x - (self.at_points(x) - targets) @ inv.T
        return x

    def on_axes(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """(3, X, Y, Z) float32 template mm for the grid spanned by ``axes`` (swellings included)."""
        coords = self.elastic.on_axes(axes)
        rel = [(a - c).astype(np.float32) for a, c in zip(axes, self.centre)]
        for i in range(3):
            coords[i] += (
                self.linear[i, 0] * rel[0][:, None, None]
                + self.linear[i, 1] * rel[1][None, :, None]
                + self.linear[i, 2] * rel[2][None, None, :]
                + np.float32(self.centre[i] + self.shift[i])
            )
        for swelling in self.swellings:
            found = swelling.displacement(axes)
            if found is None:
                continue
            box, disp = found
            # the swelling acts in subject space; carry its displacement through the linear part (the elastic
            # part is too smooth to matter over a swelling's extent)
            for i in range(3):
                coords[(i, *box)] += (
                    self.linear[i, 0] * disp[0] + self.linear[i, 1] * disp[1] + self.linear[i, 2] * disp[2]
                )
        for inflation in self.inflations:
            inflation.apply(coords)
        return coords


def random_transform(
    rng: np.random.Generator, grid: Grid, elastic_std: float, rotation_deg: float, scale_std: float, shift_std: float
) -> SubjectTransform:
    """A subject's random small affine (rotation, anisotropic scale, shift) plus smooth elastic deformation."""
    angles = np.deg2rad(rng.normal(0.0, rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    # one global size factor and a smaller per-axis part: brains differ more in size than in shape
    scale = np.exp(rng.normal(0.0, scale_std) + rng.normal(0.0, scale_std / 2, 3))
    linear = rot @ np.diag(1.0 / scale)  # pull-back: a larger subject samples the template more densely
    axes = grid.axes()
    lo, hi = [a[0] for a in axes], [a[-1] for a in axes]
    elastic = SplineField.random(rng, lo, hi, lattice_spacing=32.0, std=elastic_std)
    return SubjectTransform(linear, rng.normal(0.0, shift_std, 3), elastic, np.array(GRID_CENTRE_MNI, float), [])


@functools.lru_cache(maxsize=1)
def _template_brain_bounds() -> tuple[np.ndarray, np.ndarray]:
    """World-mm corners of the template brain's bounding box."""
    template = load_template()
    nz = [np.nonzero(template.total.max(axis=tuple(j for j in range(3) if j != i)) > 0.05)[0] for i in range(3)]
    lo = np.array([n[0] for n in nz], float) * np.diag(template.affine)[:3] + template.affine[:3, 3]
    hi = np.array([n[-1] for n in nz], float) * np.diag(template.affine)[:3] + template.affine[:3, 3]
    return lo, hi


def brain_box(grid: Grid, transform: SubjectTransform, margin_mm: float = 14.0) -> tuple[slice, slice, slice]:
    """Index box of the output grid that holds the subject's brain: the template brain's bounding box pulled
    back through the transform's affine part, widened by ``margin_mm`` for the elastic part and swellings."""
    lo_mm, hi_mm = _template_brain_bounds()
    corners = np.array(
        [[a, b, c] for a in (lo_mm[0], hi_mm[0]) for b in (lo_mm[1], hi_mm[1]) for c in (lo_mm[2], hi_mm[2])]
    )
    inv = np.linalg.inv(transform.linear)
    out = transform.centre + (corners - transform.centre - transform.shift) @ inv.T
    lo = (out.min(0) - margin_mm - np.array(grid.origin)) / np.array(grid.spacing)
    hi = (out.max(0) + margin_mm - np.array(grid.origin)) / np.array(grid.spacing)
    return tuple(slice(int(max(0, np.floor(a))), int(min(n, np.ceil(b) + 1))) for a, b, n in zip(lo, hi, grid.shape))


def sample_template(template: Template, coords_mm: np.ndarray, coarse_step: int = 1) -> dict[str, np.ndarray]:
    """Tissue fractions at (3, ...) template-mm coordinates (trilinear, zero outside the template).

    With ``coarse_step`` k > 1 the grid is first probed every k voxels and only the neighbourhood of the brain
    found there is interpolated (the rest of the box is background): about half the work on the BraTS grid.
    """
    index = coords_mm.copy()
    for i in range(3):
        index[i] -= np.float32(template.affine[i, 3])
        index[i] /= np.float32(template.affine[i, i])
    # the template carries a zero border, so 'nearest' equals zero padding, and is faster than 'constant'
    interpolate = functools.partial(ndi.map_coordinates, order=1, mode="nearest", output=np.float32)
    if coarse_step <= 1 or coords_mm.ndim != 4:
        return {k: interpolate(v, index) for k, v in template.maps.items()}
    k = int(coarse_step)
    probe = index[:, ::k, ::k, ::k]
    found = interpolate(template.total, probe) > 0
    found = ndi.binary_dilation(found, iterations=1)
    region = found.repeat(k, 0).repeat(k, 1).repeat(k, 2)[tuple(slice(0, n) for n in index.shape[1:])]
    points = index[:, region]
    out = {}
    for name, v in template.maps.items():
        values = np.zeros(region.shape, np.float32)
        values[region] = interpolate(v, points)
        out[name] = values
    return out

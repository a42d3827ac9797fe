"""New tumour masks from existing ones: scale the tumour about its centre and move it elsewhere inside the brain.

Med-DDPM's downstream experiment made 2,000 extra masks from 1,000 by scaling each tumour from 2.0x down to
0.5x (20 factors) and shifting it inside the head (FACTS.md section 1). Here a tumour is the set of voxels with
tumour labels in a canonical segmentation; its internal structure (core, edema, enhancing rim) is scaled with it
(nearest-neighbour, so labels stay labels). A placement is accepted only if every tumour voxel lies inside the
region mask (brain, or head for whole-head models); the region mask itself never changes.

Uniform scaling about a point is the same operation in voxel indices and in millimetres, so anisotropic voxels
need no special care.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from brainsynth.conditioning.semantic_mask import TUMOUR_LABELS

logger = logging.getLogger("scripts.mask_augmentation")

#: the paper's factors: 2.0x down to 0.5x in 20 steps
PAPER_SCALE_FACTORS: tuple[float, ...] = tuple(float(f) for f in np.linspace(2.0, 0.5, 20))


def tumour_mask(seg: np.ndarray, labels: Sequence[int] = TUMOUR_LABELS) -> np.ndarray:
    return np.isin(seg, list(labels))


def scale_tumour(
    seg: np.ndarray, factor: float, labels: Sequence[int] = TUMOUR_LABELS, centre: Sequence[float] | None = None
) -> np.ndarray:
    """``seg`` with its tumour scaled by ``factor`` about ``centre`` (default: the tumour's centroid).

    Non-tumour labels are kept where the scaled tumour does not cover them; the tumour's old position becomes
    background (0). Returns a new array of the same shape and dtype.
    """
    if factor <= 0:
        raise ValueError(f"scale factor must be positive, got {factor}")
    seg = np.asarray(seg)
    tumour = tumour_mask(seg, labels)
    if not tumour.any():
        raise ValueError("segmentation has no tumour voxels to scale")
    c = np.asarray(ndimage.center_of_mass(tumour) if centre is None else centre, dtype=np.float64)
    tumour_labels = np.where(tumour, seg, 0)
    # output voxel x samples the input at c + (x - c) / factor
    matrix = np.full(seg.ndim, 1.0 / factor)
    scaled = ndimage.affine_transform(tumour_labels, matrix, offset=c - c / factor, order=0, mode="constant", cval=0)
    out = np.where(tumour, 0, seg).astype(seg.dtype)
    out[scaled > 0] = scaled[scaled > 0]
    return out


def move_tumour(seg: np.ndarray, shift: Sequence[int], labels: Sequence[int] = TUMOUR_LABELS) -> np.ndarray | None:
    """``seg`` with its tumour shifted by ``shift`` voxels; ``None`` if the tumour would leave the volume."""
    seg = np.asarray(seg)
    shift = tuple(int(s) for s in shift)
    if len(shift) != seg.ndim:
        raise ValueError(f"shift {shift} must have {seg.ndim} entries")
    tumour = tumour_mask(seg, labels)
    idx = np.nonzero(tumour)
    new_idx = tuple(i + s for i, s in zip(idx, shift))
    if any((n.min() < 0 or n.max() >= dim) for n, dim in zip(new_idx, seg.shape) if n.size):
        return None
    out = np.where(tumour, 0, seg).astype(seg.dtype)
    out[new_idx] = seg[idx]
    return out


def tumour_inside(seg: np.ndarray, region: np.ndarray, labels: Sequence[int] = TUMOUR_LABELS) -> bool:
    """Every tumour voxel lies inside ``region`` (e.g. the brain mask)."""
    tumour = tumour_mask(seg, labels)
    return bool(tumour.any()) and not np.any(tumour & ~(np.asarray(region) > 0))


@dataclass
class AugmentedMask:
    seg: np.ndarray
    factor: float
    shift: tuple[int, ...]


def augment_tumour(
    seg: np.ndarray,
    region: np.ndarray,
    factors: Sequence[float] = PAPER_SCALE_FACTORS,
    rng: np.random.Generator | int | None = 0,
    max_tries: int = 100,
    keep_position_first: bool = False,
    labels: Sequence[int] = TUMOUR_LABELS,
) -> Iterator[AugmentedMask]:
    """For each factor, scale the tumour and place it at a random position inside ``region``.

    Positions are drawn by picking a random region voxel as the new tumour centroid; the first of ``max_tries``
    placements that keeps the whole tumour inside the region is used (with ``keep_position_first`` the original
    position is tried before random ones). A factor with no valid placement is skipped (logged), so fewer masks
    than factors may come back - e.g. a 2x tumour that cannot fit in the brain.
    """
    seg = np.asarray(seg)
    region = np.asarray(region) > 0
    if seg.shape != region.shape:
        raise ValueError(f"segmentation shape {seg.shape} differs from the region mask's {region.shape}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    region_voxels = np.argwhere(region)
    if not len(region_voxels):
        raise ValueError("region mask is empty")
    for factor in factors:
        scaled = scale_tumour(seg, float(factor), labels)
        if not tumour_mask(scaled, labels).any():
            logger.info("scale %.3f: tumour vanished (too small to resample)", factor)
            continue
        centroid = np.asarray(ndimage.center_of_mass(tumour_mask(scaled, labels)))
        placed = None
        for attempt in range(max_tries):
            if attempt == 0 and keep_position_first:
                shift = np.zeros(seg.ndim, int)
            else:
                target = region_voxels[rng.integers(len(region_voxels))]
                shift = np.round(target - centroid).astype(int)
            moved = move_tumour(scaled, shift, labels)
            if moved is not None and tumour_inside(moved, region, labels):
                placed = AugmentedMask(moved, float(factor), tuple(int(s) for s in shift))
                break
        if placed is None:
            logger.info("scale %.3f: no placement inside the region after %d tries; skipped", factor, max_tries)
            continue
        yield placed


def write_augmented_masks(
    items: Sequence[dict],
    out_dir: str | Path,
    factors: Sequence[float] = PAPER_SCALE_FACTORS,
    per_subject: int | None = None,
    seed: int = 0,
    region_key: str = "brain_mask",
    seg_key: str = "seg",
    image_keys: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write augmented segmentations for dataset rows and a datalist of them; returns the datalist path.

    ``items`` are rows with ``seg`` (canonical labels after loading: pass rows from ``brainsynth.data`` whose
    ``label_convention`` says how to read the file) and a region mask. Each new segmentation is written in
    canonical labels, in its source's geometry, as ``<out_dir>/<subject>_aug<k>_seg.nii.gz``; the rows of
    ``<out_dir>/datalist.json`` keep the source's region mask path and record scale and shift. ``per_subject``
    draws that many distinct factors per subject (seeded); ``None`` uses them all. A row without a
    region mask gets one from the non-zero voxels of its ``image_keys`` files (skull-stripped BraTS has an
    exactly-zero background), written once as ``<out_dir>/<subject>_<region_key>.nii.gz``.
    """
    from brainsynth.data import remap_labels
    from brainsynth.data.reader import nifti_voxels, open_nifti, read_nifti
    from brainsynth.engine.io import atomic_write_text, save_nifti

    out_dir = Path(out_dir)
    datalist = out_dir / "datalist.json"
    if datalist.exists() and not overwrite:
        from brainsynth.engine.io import OutputExistsError

        raise OutputExistsError(f"{datalist}: already exists; pass overwrite=True or choose another folder")
    rng = np.random.default_rng(seed)
    rows = []
    for item in items:
        seg_path = Path(item[seg_key])
        seg_img = open_nifti(seg_path)
        subject = str(item.get("subject", seg_path.name.split(".")[0]))
        seg = remap_labels(nifti_voxels(seg_img), item.get("label_convention") or "canonical", str(seg_path)).astype(
            np.int16
        )
        if item.get(region_key):
            region_path = Path(item[region_key])
            region = read_nifti(str(region_path))[0] > 0
        else:
            images = [item[k] for k in image_keys if item.get(k)]
            if not images:
                raise ValueError(f"{seg_path}: subject {subject} has no {region_key} and no images to derive it from")
            region = np.zeros(seg.shape, bool)
            for image in images:
                region |= read_nifti(str(image))[0] != 0
            region_path = out_dir / f"{subject}_{region_key}.nii.gz"
            save_nifti(region.astype(np.uint8), region_path, reference=seg_img, overwrite=overwrite, dtype=np.uint8)
        if not tumour_mask(seg).any():
            logger.info("%s: no tumour, no augmented masks", seg_path)
            continue
        chosen = list(factors)
        if per_subject is not None and per_subject < len(chosen):
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), size=per_subject, replace=False))]
        for k, aug in enumerate(augment_tumour(seg, region, chosen, rng)):
            path = out_dir / f"{subject}_aug{k:02d}_seg.nii.gz"
            save_nifti(aug.seg, path, reference=seg_img, overwrite=overwrite, dtype=np.int16)
            rows.append(
                {
                    "subject": f"{subject}_aug{k:02d}",
                    "seg": path.name,
                    region_key: str(region_path.resolve()),
                    "source_subject": subject,
                    "scale": aug.factor,
                    "shift": list(aug.shift),
                    "pathology": item.get("pathology", "glioblastoma"),
                    "label_convention": "canonical",
                }
            )
    atomic_write_text(
        datalist, json.dumps({"label_convention": "canonical", "augmented": rows}, indent=1), overwrite=overwrite
    )
    return datalist

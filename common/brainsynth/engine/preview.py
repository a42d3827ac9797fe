"""PNG previews of brain volumes (pillow only): axial, coronal and sagittal views with segmentation outlines.

Arrays are RAS (first axis towards the patient's right, second anterior, third superior), as NIfTI files become
after ``nibabel.as_closest_canonical`` and as the simulated cohort writes them. Views follow the radiological
convention: the patient's right is on the viewer's left; anterior is up in axial views and left in sagittal ones.
Slices go through the centre of the segmented region when there is one, else through the brain's centre.

``save_preview``: one subject, a row per volume, a column per view. ``save_montage``: several subjects, a row
per subject, a column per volume (one view). ``preview_cohort``: a montage of any dataset brainsynth.data reads.
CLI: ``python -m brainsynth.engine.preview DATASET_OR_DATALIST --out preview.png``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brainsynth.conventions import LABELS
from brainsynth.conventions import label_convention as get_label_convention
from brainsynth.engine.io import atomic_path

#: outline colour per canonical label (BraTS habit: necrosis red, edema green, enhancing yellow; lesions cyan)
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (235, 50, 50),
    2: (40, 215, 70),
    3: (255, 215, 0),
    4: (0, 200, 255),
}
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: column headings: the view and which patient side is on the viewer's left / right
_VIEW_HEADINGS = {"axial": "axial  (R | L)", "coronal": "coronal  (R | L)", "sagittal": "sagittal  (A | P)"}
#: displayed size of the longest field-of-view side of a panel, pixels
PANEL_PIXELS = 240
_MARGIN, _HEADER = 64, 18


def _as_array(volume: Any, name: str) -> np.ndarray:
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    array = np.asarray(volume)
    while array.ndim > 3 and array.shape[0] == 1:  # MONAI channel-first single channel
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"preview: {name} must be a 3-D volume, got shape {array.shape}")
    return array


def _canonical_seg(seg: Any, convention: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if seg is None:
        return None
    seg = np.rint(_as_array(seg, "seg")).astype(np.int64)
    if seg.shape != shape:
        raise ValueError(f"preview: seg shape {seg.shape} differs from the volumes' {shape}")
    if convention and convention != "canonical":
        table = get_label_convention(convention).to_canonical
        mapped = np.zeros_like(seg)
        for value, canonical in table.items():
            mapped[seg == value] = canonical
        seg = mapped
    return seg


def _centre(volumes: Sequence[np.ndarray], seg: np.ndarray | None) -> tuple[int, int, int]:
    """Voxel the three views pass through: centroid of the segmentation, else middle of the brain's box."""
    if seg is not None and (seg > 0).any():
        return tuple(int(round(c)) for c in np.argwhere(seg > 0).mean(0))
    nonzero = np.zeros(volumes[0].shape, bool)
    for v in volumes:
        nonzero |= v != 0
    if not nonzero.any():
        return tuple(n // 2 for n in volumes[0].shape)
    idx = np.argwhere(nonzero)
    return tuple(int(c) for c in (idx.min(0) + idx.max(0)) // 2)


def _view(array: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    """2-D display array (rows top to bottom) of a RAS volume."""
    i, j, k = centre
    if view == "axial":
        return array[::-1, ::-1, k].T
    if view == "coronal":
        return array[::-1, j, ::-1].T
    if view == "sagittal":
        return array[i, ::-1, ::-1].T
    raise ValueError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")


def _view_spacing(spacing: Sequence[float], view: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a view."""
    sx, sy, sz = spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[view]


def _window(array: np.ndarray) -> tuple[float, float]:
    """Display range of a volume: 0 (or its minimum if negative) to 1.1 x the 99.5th percentile of its non-zero
    voxels (the brightest large tissue stays below white, so small bright lesions stand out)."""
    values = array[array != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo = min(0.0, float(np.percentile(values, 0.5)))
    hi = 1.1 * float(np.percentile(values, 99.5))
    return lo, hi if hi > lo else lo + 1.0


def _panel(array: np.ndarray, seg: np.ndarray | None, view: str, centre, spacing, window, scale: float):
    """RGB uint8 panel of one view, resampled to square pixels of ``1 / scale`` mm, outlines drawn 1 px wide."""
    from PIL import Image

    row_mm, col_mm = _view_spacing(spacing, view)
    plane = _view(array, view, centre).astype(np.float32)
    size = (max(1, int(round(plane.shape[1] * col_mm * scale))), max(1, int(round(plane.shape[0] * row_mm * scale))))
    lo, hi = window
    grey = np.clip((plane - lo) / (hi - lo), 0.0, 1.0) * 255.0
    grey = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize(size, Image.BILINEAR))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if seg is not None:
        labels = np.asarray(Image.fromarray(_view(seg, view, centre).astype(np.uint8)).resize(size, Image.NEAREST))
        for value, colour in LABEL_COLOURS.items():
            region = labels == value
            if not region.any():
                continue
            inner = region.copy()
            inner[1:, :] &= region[:-1, :]
            inner[:-1, :] &= region[1:, :]
            inner[:, 1:] &= region[:, :-1]
            inner[:, :-1] &= region[:, 1:]
            rgb[region & ~inner] = colour
    return rgb


def _paste(canvas: np.ndarray, panel: np.ndarray, top: int, left: int) -> None:
    h = min(panel.shape[0], canvas.shape[0] - top)
    w = min(panel.shape[1], canvas.shape[1] - left)
    canvas[top : top + h, left : left + w] = panel[:h, :w]


def _write_png(canvas: np.ndarray, texts: list[tuple[int, int, str]], path, overwrite: bool) -> Path:
    from PIL import Image, ImageDraw

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for x, y, text in texts:
        draw.text((x, y), text, fill=(255, 255, 255))
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG")
    return path


def _legend(seg_present: set[int]) -> str:
    names = {1: "necrotic core", 2: "edema", 3: "enhancing", 4: "lesion"}
    return "  ".join(
        f"{names[v]}={c}" for v, c in zip(LABEL_COLOURS, ("red", "green", "yellow", "cyan")) if v in seg_present
    )


def save_preview(
    volumes: Mapping[str, Any],
    path: str | os.PathLike,
    seg: Any = None,
    overwrite: bool = False,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    label_convention: str | None = None,
    centre: Sequence[int] | None = None,
) -> Path:
    """PNG with a row per volume (e.g. ``{"t1w": array, ...}``) and axial / coronal / sagittal columns, the
    segmentation (canonical labels, or ``label_convention``'s) outlined on every panel."""
    if not volumes:
        raise ValueError("preview: no volumes given")
    arrays = {name: _as_array(v, name) for name, v in volumes.items()}
    shape = next(iter(arrays.values())).shape
    for name, a in arrays.items():
        if a.shape != shape:
            raise ValueError(f"preview: {name} has shape {a.shape}, the first volume {shape}")
    seg_c = _canonical_seg(seg, label_convention, shape)
    centre = tuple(centre) if centre is not None else _centre(list(arrays.values()), seg_c)
    fov = np.multiply(shape, spacing)
    scale = PANEL_PIXELS / float(max(fov))
    panels = {
        name: [_panel(a, seg_c, view, centre, spacing, _window(a), scale) for view in VIEWS]
        for name, a in arrays.items()
    }
    col_w = [max(p[c].shape[1] for p in panels.values()) for c in range(len(VIEWS))]
    row_h = [max(p.shape[0] for p in row) for row in panels.values()]
    top0 = _HEADER * (2 if title else 1)
    canvas = np.zeros(
        (top0 + sum(row_h) + len(row_h) * 2 + _HEADER, _MARGIN + sum(col_w) + 2 * len(col_w), 3), np.uint8
    )
    texts = [(4, 2, title)] if title else []
    lefts = np.cumsum([_MARGIN] + [w + 2 for w in col_w])[:-1]
    texts += [(int(l) + 2, top0 - _HEADER + 2, _VIEW_HEADINGS[v]) for l, v in zip(lefts, VIEWS)]
    top = top0
    for (name, row), h in zip(panels.items(), row_h):
        texts.append((4, top + h // 2 - 6, name))
        for panel, left in zip(row, lefts):
            _paste(canvas, panel, top, int(left))
        top += h + 2
    if seg_c is not None:
        texts.append((4, top + 2, _legend(set(np.unique(seg_c).tolist()))))
    return _write_png(canvas, texts, path, overwrite)


def save_training_preview(engine: Any, out_dir: str | os.PathLike, volumes: Mapping[str, Any], **kwargs: Any) -> Path:
    """``save_preview`` as ``<out_dir>/preview_iterationNNNNNNN.png`` for the engine's current iteration: what every
    bundle's training-preview ``fn`` (``brainsynth.engine.training.TrainingPreview``) writes."""
    path = Path(out_dir) / f"preview_iteration{engine.state.iteration:07d}.png"
    save_preview(volumes, path, overwrite=True, **kwargs)
    logging.getLogger(__name__).info("training preview: %s", path)
    return path


def save_montage(
    subjects: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    view: str = "axial",
    overwrite: bool = False,
    title: str | None = None,
) -> Path:
    """PNG grid of several subjects: a row per subject, a column per volume, one view through each subject's
    lesion (or brain) centre. Each subject is ``{"volumes": {name: array}, "seg": array or None,
    "title": str, "spacing": (sx, sy, sz), "label_convention": name}`` (only "volumes" required)."""
    if not subjects:
        raise ValueError("montage: no subjects given")
    if view not in VIEWS:
        raise ValueError(f"montage: unknown view {view!r}; valid: {', '.join(VIEWS)}")
    names = list(modalities) if modalities else list(subjects[0]["volumes"])
    rows = []
    for n, subject in enumerate(subjects):
        missing = [m for m in names if m not in subject["volumes"]]
        if missing:
            raise ValueError(f"montage: subject {subject.get('title', n)} lacks {', '.join(missing)}")
        arrays = {m: _as_array(subject["volumes"][m], m) for m in names}
        shape = arrays[names[0]].shape
        spacing = subject.get("spacing", (1.0, 1.0, 1.0))
        seg = _canonical_seg(subject.get("seg"), subject.get("label_convention"), shape)
        centre = _centre(list(arrays.values()), seg)
        scale = PANEL_PIXELS * 0.75 / float(max(np.multiply(shape, spacing)))
        rows.append(
            (
                subject.get("title", f"subject {n}"),
                [_panel(arrays[m], seg, view, centre, spacing, _window(arrays[m]), scale) for m in names],
            )
        )
    col_w = [max(r[1][c].shape[1] for r in rows) for c in range(len(names))]
    row_h = [max(p.shape[0] for p in r[1]) for r in rows]
    top0 = _HEADER * (2 if title else 1)
    canvas = np.zeros((top0 + sum(row_h) + 2 * len(rows), sum(col_w) + 2 * len(col_w), 3), np.uint8)
    texts = [(4, 2, title)] if title else []
    lefts = np.cumsum([0] + [w + 2 for w in col_w])[:-1]
    texts += [
        (int(l) + 2, top0 - _HEADER + 2, f"{m}  {_VIEW_HEADINGS[view].split('  ')[1]}") for l, m in zip(lefts, names)
    ]
    top = top0
    for (label, panels), h in zip(rows, row_h):
        for panel, left in zip(panels, lefts):
            _paste(canvas, panel, top, int(left))
        texts.append((4, top + 2, label))
        top += h + 2
    return _write_png(canvas, texts, path, overwrite)


# --- datasets on disk -------------------------------------------------------------------------------------------
def _ras_for_display(image: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A loaded (1, X, Y, Z) MetaTensor -> (RAS-ordered 3-D array, voxel size in mm)."""
    import nibabel as nib

    affine = np.asarray(image.affine, dtype=np.float64)
    array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)[0]
    orientation = nib.orientations.io_orientation(affine)
    array = nib.orientations.apply_orientation(array, orientation)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = tuple(float(zooms[int(axis)]) for axis in np.argsort(orientation[:, 0]))
    return array, spacing


def preview_cohort(
    dataset: str | os.PathLike, path: str | os.PathLike | None = None, max_subjects: int = 8, overwrite: bool = False
) -> Path:
    """Montage of the first ``max_subjects`` subjects (by id) of any dataset ``brainsynth.data.discover`` reads
    (a simulated cohort, a BraTS / MSD folder, a datalist): every modality all of them have, axial view, labels
    outlined. Written to ``path`` (default ``preview.png`` in the dataset folder / beside the datalist)."""
    from brainsynth.conventions import MODALITIES
    from brainsynth.data import LoadSubjectd, available_modalities, discover

    dataset = Path(dataset)
    rows = sorted(discover(dataset), key=lambda r: str(r["subject"]))[:max_subjects]
    names = [m for m in MODALITIES if all(m in available_modalities(r) for r in rows)]
    if not names:
        raise ValueError(f"{dataset}: its first {len(rows)} subjects share no modality to show")
    loader = LoadSubjectd(keys=names)
    subjects = []
    for row in rows:
        loaded = loader(row)  # segmentation remapped to canonical labels
        volumes = {}
        for m in names:
            volumes[m], spacing = _ras_for_display(loaded[m])
        seg = _ras_for_display(loaded["seg"])[0] if "seg" in loaded else None
        subjects.append(
            {
                "volumes": volumes,
                "seg": seg,
                "spacing": spacing,
                "title": f"{row['subject']} {row.get('pathology', '')}".strip(),
            }
        )
    folder = dataset if dataset.is_dir() else dataset.parent
    path = Path(path) if path is not None else folder / "preview.png"
    return save_montage(
        subjects,
        path,
        modalities=names,
        overwrite=overwrite,
        title=f"{folder.name}: first {len(rows)} subjects; outlines {_legend(set(LABELS) - {0})}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m brainsynth.engine.preview", description=preview_cohort.__doc__)
    parser.add_argument("dataset", help="dataset folder (any layout brainsynth.data reads) or a datalist file")
    parser.add_argument("--out", default=None, help="PNG path (default: preview.png in the dataset folder)")
    parser.add_argument("--subjects", type=int, default=8, help="at most this many subjects (default 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = parser.parse_args(argv)
    try:
        print(preview_cohort(args.dataset, args.out, args.subjects, args.overwrite))
    except (ValueError, FileExistsError) as e:  # DatasetError is a ValueError
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

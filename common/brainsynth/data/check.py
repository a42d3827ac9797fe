"""Dataset validation: every problem a bundle would otherwise hit mid-training, found before any work starts.

Per subject: all headers are read first (readable? 3-D? same shape, spacing and affine as the subject's other
files?), then each file's voxels exactly once (truncated? NaN / Inf? empty or constant? label values inside the
row's convention? brain mask binary?). File names that announce a different subject id than their row are
reported too. Every problem is one line naming the file (or the subject folder, for a missing file).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from brainsynth.conventions import MODALITIES, canonical_modality, label_convention
from brainsynth.data.dicom import read_dicom_series
from brainsynth.data.discover import subject_from_path
from brainsynth.data.errors import DatasetError
from brainsynth.data.items import available_modalities, image_source
from brainsynth.data.reader import nifti_voxels, open_nifti

#: tolerances for "same grid": millimetres for spacing and for the affine (rotation-zoom and origin)
SPACING_ATOL = 1e-3
AFFINE_ATOL = 1e-3
#: plausible voxel spacing of a brain MRI in mm (the simulated demo cohorts go up to 12 mm); outside it a header is
#: almost certainly wrong (e.g. 750 mm from a unit mix-up). Set BRAINSYNTH_SPACING_RANGE="lo,hi" to change it.
PLAUSIBLE_SPACING_MM = tuple(float(v) for v in os.environ.get("BRAINSYNTH_SPACING_RANGE", "0.1,20").split(","))


def _shear(affine: np.ndarray) -> float:
    """The largest |cosine| between two voxel axes of an affine (0 for a rotation with scaling)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    axes = axes / np.maximum(np.linalg.norm(axes, axis=0), 1e-12)
    gram = np.abs(axes.T @ axes - np.eye(3))
    return float(gram.max())


@dataclass
class SubjectReport:
    subject: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    synthetic: list[str] = field(default_factory=list)  # image files carrying the brainsynth provenance mark

    @property
    def usable(self) -> bool:
        return not self.problems


@dataclass
class _File:
    """One file to check: its role in the row and what its voxels should look like."""

    role: str  # modality, "image4d", "seg" or "brain_mask"
    path: str
    channels: list[str] | None = None  # for a 4-D file: expected channel names
    channel: int | None = None  # a per-scan row pointing into one channel of a 4-D file
    # filled by the header pass
    image: Any = None
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    data: np.ndarray | None = None  # DICOM series are read whole in the header pass


def _files_of(row: dict[str, Any]) -> list[_File]:
    files: list[_File] = []
    if "image" in row and "modality" in row:  # a per-scan row from expand_scans
        files.append(_File(str(row["modality"]), str(row["image"]), channel=row.get("image_channel")))
    else:
        for m in MODALITIES:
            source = image_source(row, m)
            if source and source[1] is None:
                files.append(_File(m, source[0]))
        if row.get("image4d"):
            files.append(_File("image4d", str(row["image4d"]), channels=list(row.get("image4d_channels") or [])))
    for role in ("seg", "brain_mask"):
        if row.get(role):
            files.append(_File(role, str(row[role])))
    return files


def _read_header(f: _File) -> str | None:
    """Fill shape / spacing / affine; return a problem line or None."""
    path = Path(f.path)
    if not path.exists():
        return f"{path}: file not found"
    if path.is_dir():
        try:
            f.data, f.affine = read_dicom_series(path)
        except DatasetError as e:
            return str(e)
        f.shape = f.data.shape
        f.spacing = tuple(float(s) for s in np.linalg.norm(f.affine[:3, :3], axis=0))
        return None
    try:
        f.image = open_nifti(path)
        shape = tuple(int(s) for s in f.image.shape)
        f.affine = np.asarray(f.image.affine, dtype=np.float64)
        f.spacing = tuple(float(z) for z in f.image.header.get_zooms()[:3])
    except DatasetError as e:
        return str(e)
    except Exception as e:  # a header nibabel parsed but cannot describe (e.g. a broken affine)
        return f"{path}: unreadable header ({type(e).__name__}: {_one_line(e) or 'bad header'})"
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is a 3-D volume
        shape = shape[:-1]
    f.shape = shape
    wants_4d = f.channels is not None or f.channel is not None
    if wants_4d:
        if len(shape) != 4:
            return f"{path}: is {len(shape)}-D (shape {shape}), a 4-D multi-channel image is expected"
        n = len(f.channels) if f.channels is not None else f.channel + 1
        if (f.channels is not None and shape[3] != n) or shape[3] < n:
            return f"{path}: has {shape[3]} channels, {n} expected ({', '.join(f.channels or [])})"
    elif len(shape) != 3:
        what = "4-D" if len(shape) == 4 else f"{len(shape)}-D"
        return f"{path}: is {what} (shape {shape}) where a 3-D volume is expected"
    return None


def _read_data(f: _File) -> tuple[np.ndarray | None, str | None]:
    if f.data is not None:
        return f.data, None
    try:
        data = nifti_voxels(f.image, f.path)
    except DatasetError as e:
        return None, str(e)
    return data.reshape(f.shape), None


def _check_image(f: _File, data: np.ndarray) -> list[str]:
    problems = []
    if f.channel is not None:
        data = data[..., f.channel]
    volumes = (
        [(None, data)]
        if data.ndim == 3
        else [((f.channels or [])[c] if f.channels else c, data[..., c]) for c in range(data.shape[3])]
    )
    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(data)))
            return [f"{f.path}: contains {n_nan} NaN and {bad - n_nan} Inf voxels"]
    for name, vol in volumes:
        lo, hi = vol.min(), vol.max()
        if lo == hi:
            where = f" channel {name}" if name is not None else ""
            state = "empty (all zeros)" if lo == 0 else f"constant (every voxel = {lo:g})"
            problems.append(f"{f.path}:{where} is {state}")
    return problems


def _label_values(data: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Sorted distinct integer values, or a problem when the file is not an integer label map."""
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            return None, "contains NaN or Inf voxels"
        rounded = np.round(data)
        if not np.array_equal(rounded, data):
            return None, "has non-integer values; a label map must hold integer labels"
        data = rounded.astype(np.int64)
    lo, hi = int(data.min()), int(data.max())
    if hi - lo < 1_000_000:  # bincount is one pass; unique sorts
        counts = np.bincount((data.astype(np.int64) - lo).ravel())
        return np.nonzero(counts)[0] + lo, None
    return np.unique(data), None


def _check_labels(f: _File, data: np.ndarray, convention_name: str) -> list[str]:
    values, problem = _label_values(data)
    if problem:
        return [f"{f.path}: {problem}"]
    if f.role == "brain_mask":
        if not set(values.tolist()) <= {0, 1}:
            return [f"{f.path}: brain mask holds values {values.tolist()}, only 0 and 1 are allowed"]
        if values.tolist() == [0]:
            return [f"{f.path}: brain mask is empty (all zeros)"]
        return []
    convention = label_convention(convention_name)
    outside = sorted(set(values.tolist()) - convention.valid_values)
    if outside:
        return [
            f"{f.path}: label values {outside} are outside the {convention.name} convention ({convention.description})"
        ]
    return []


def _subject_id_problems(row: dict[str, Any], files: list[_File]) -> list[str]:
    """Files whose names announce a different subject than their row (e.g. a stray file in a BraTS folder)."""
    subject = str(row.get("subject"))
    ids = {f.path: subject_from_path(f.path) for f in files}
    ids = {p: i for p, i in ids.items() if i}
    if not ids:
        return []
    if subject in ids.values():
        expected = subject
    else:  # names do not use the row's id; they must at least agree with each other
        values = list(ids.values())
        expected = max(set(values), key=values.count)
    return [
        f"{p}: file name says subject {i!r}, but its folder / other files say {expected!r}"
        for p, i in ids.items()
        if i != expected
    ]


def _subject_folder(row: dict[str, Any], files: list[_File]) -> str:
    if not files:
        return str(row.get("subject"))
    return os.path.commonpath([str(Path(f.path).parent) for f in files])


def check_row(
    row: dict[str, Any], required_modalities: Sequence[str] = (), require_seg: bool = False, read_data: bool = True
) -> SubjectReport:
    """Check one canonical row (or a per-scan row); see the module docstring for what is checked."""
    report = SubjectReport(str(row.get("subject")))
    files = _files_of(row)
    report.modalities = available_modalities(row)
    folder = _subject_folder(row, files)
    per_scan = "image" in row and "modality" in row  # one scan by definition: nothing else can be missing
    missing = [] if per_scan else [m for m in required_modalities if m not in report.modalities]
    if missing:
        report.problems.append(
            f"{folder}: subject {report.subject} has no {', '.join(missing)} image "
            f"(has {', '.join(report.modalities) or 'none'})"
        )
    if require_seg and not row.get("seg"):
        report.problems.append(f"{folder}: subject {report.subject} has no segmentation")
    if not row.get("pathology"):
        report.notes.append("no pathology label")
    if row.get("layout") == "brats-peds" and row.get("label_convention") == "peds2024":
        # the 2023 PEDs release numbered labels like GLI; nothing in the files tells the releases apart
        report.notes.append(
            "labels read as BraTS-PEDs 2024 (1 ET, 2 NET, 3 cyst, 4 ED); "
            "pass --label-convention brats2023 for the 2023 release"
        )
    report.problems += _subject_id_problems(row, files)

    # 1) headers: readable, dimensionality, one grid for all files of the subject
    readable = []
    for f in files:
        problem = _read_header(f)
        if problem:
            report.problems.append(problem)
        else:
            readable.append(f)
    report.synthetic, marks_problems = _synthetic_marks(readable)
    report.problems += marks_problems
    if readable:
        ref = _reference(readable)
        report.shape, report.spacing = ref.shape[:3], ref.spacing
        low, high = PLAUSIBLE_SPACING_MM  # the other files are compared with this one below
        if ref.spacing and not all(low <= z <= high for z in ref.spacing):
            report.problems.append(
                f"{ref.path}: voxel spacing {_fmt(ref.spacing)} mm is outside the plausible {low:g} to {high:g} mm "
                f"of a brain MRI; the header's units or affine are likely wrong (BRAINSYNTH_SPACING_RANGE changes "
                f"the range)"
            )
        elif ref.affine is not None and abs(np.linalg.det(ref.affine[:3, :3])) < 1e-9:
            report.problems.append(f"{ref.path}: the affine is not invertible (a zero or degenerate axis)")
        elif ref.affine is not None and _shear(ref.affine) > 1e-2:
            report.problems.append(
                f"{ref.path}: the affine is sheared (its voxel axes are not perpendicular, cosine "
                f"{_shear(ref.affine):.3f}); MRI volumes have perpendicular axes, so the header is likely damaged"
            )
        for f in readable:
            if f is ref:
                continue
            if f.shape[:3] != ref.shape[:3]:
                report.problems.append(
                    f"{f.path}: shape {f.shape[:3]} differs from {Path(ref.path).name} {ref.shape[:3]}"
                )
            elif not np.allclose(f.spacing, ref.spacing, atol=SPACING_ATOL):
                report.problems.append(
                    f"{f.path}: voxel spacing {_fmt(f.spacing)} mm differs from "
                    f"{Path(ref.path).name} {_fmt(ref.spacing)} mm"
                )
            elif not np.allclose(f.affine, ref.affine, atol=AFFINE_ATOL):
                report.problems.append(
                    f"{f.path}: affine (position / orientation) differs from "
                    f"{Path(ref.path).name}; the files are not co-registered"
                )
    if not read_data:
        return report

    # 2) voxels, each file read once
    for f in readable:
        data, problem = _read_data(f)
        if problem:
            report.problems.append(problem)
            continue
        if f.role in ("seg", "brain_mask"):
            report.problems += _check_labels(f, data, row.get("label_convention") or "canonical")
        else:
            report.problems += _check_image(f, data)
        f.data = f.image = None  # free the memory before the next file
    return report


def _synthetic_marks(files: list[_File]) -> tuple[list[str], list[str]]:
    """(image files marked synthetic, problem lines) from the headers already read (and any sidecar)."""
    from brainsynth.data.provenance import read_provenance

    marked, problems = [], []
    for f in files:
        if f.role not in MODALITIES:
            continue
        try:
            if read_provenance(f.path, header=f.image.header if f.image is not None else None):
                marked.append(f.path)
        except DatasetError as e:
            problems.append(str(e))
    return marked, problems


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _reference(files: list[_File]) -> _File:
    """The file whose grid most of the subject's files share, so only the odd one out is reported."""

    def grid(f: _File):
        return f.shape[:3], tuple(np.round(f.affine, 2).ravel())

    grids = [grid(f) for f in files]
    return files[max(range(len(files)), key=lambda i: (grids.count(grids[i]), -i))]


def _fmt(values: Iterable[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def check_items(
    items: Iterable[dict[str, Any]],
    required_modalities: Sequence[str] | None = None,
    require_seg: bool = False,
    read_data: bool = True,
    num_workers: int = 1,
) -> list[SubjectReport]:
    """A report per row. ``required_modalities`` None means every modality any row of the dataset has."""
    items = list(items)
    if required_modalities is None:
        present = {m for row in items for m in available_modalities(row)}
        required = [m for m in MODALITIES if m in present]
    else:
        required = [canonical_modality(m) for m in required_modalities]

    def one(row):
        return check_row(row, required, require_seg, read_data)

    if num_workers > 1:  # decompression and numpy reductions release the GIL
        with ThreadPoolExecutor(num_workers) as pool:
            reports = list(pool.map(one, items))
    else:
        reports = [one(row) for row in items]
    # a subject has one row (per-scan rows: one per modality); more would leak it across splits
    ids = [(r.subject, row.get("modality") if "image" in row else None) for row, r in zip(items, reports)]
    counts = Counter(ids)
    for row, report, key in zip(items, reports, ids):
        if counts[key] > 1:
            report.problems.append(
                f"{_subject_folder(row, _files_of(row))}: subject id {report.subject!r} is "
                f"used by {counts[key]} rows; ids must be unique"
            )
    return reports


def validate_items(
    items: Iterable[dict[str, Any]],
    required_modalities: Sequence[str] | None = None,
    require_seg: bool = False,
    read_data: bool = True,
    num_workers: int = 1,
) -> list[dict[str, Any]]:
    """Raise DatasetError (one line per problem, each naming the file) unless every row is usable; return the
    rows so a bundle config can write ``"$brainsynth.data.validate_items(@items, ['t1w'], True)"``."""
    items = list(items)
    if not items:
        raise DatasetError("the dataset has no subjects to validate")
    problems = [
        p for r in check_items(items, required_modalities, require_seg, read_data, num_workers) for p in r.problems
    ]
    if problems:
        raise DatasetError(problems)
    return items

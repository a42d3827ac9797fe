"""Writing a simulated cohort to disk in a real dataset's layout, with a datalist.json.

Layouts (file names as the real releases; ``pd`` and the brain mask are extras the releases lack):
  brats2023  <ID>/<ID>-{t1n,t1c,t2w,t2f,pd,seg,brain_mask}.nii.gz        IDs BraTS-GLI-00000-000, ...
  brats2021  <ID>/<ID>_{t1,t1ce,t2,flair,pd,seg,brain_mask}.nii.gz       IDs BraTS2021_00000, ...
  msd        imagesTr/<ID>.nii.gz (4-D: FLAIR, T1w, T1gd, T2w), labelsTr/<ID>.nii.gz, dataset.json,
             plus pdTr/<ID>.nii.gz and masksTr/<ID>.nii.gz           IDs BRATS_001, ...

Labels: each segmentation uses its layout's convention (brainsynth.conventions.LAYOUT_LABELS), except that
sclerosis lesions (canonical 4) exist in no BraTS / MSD convention, so sclerosis subjects are written in the
"canonical" convention (0 background, 4 lesion) and their datalist rows say so; in
BraTS 2021 files value 4 therefore means enhancing tumour in tumour subjects and lesion in sclerosis subjects -
always read the row's ``label_convention``.

``generate_cohort`` is idempotent: a folder that already holds a cohort made with the same parameters is reused
as is; different parameters are an error unless ``overwrite=True``. An interrupted run is resumed (the simulation
is deterministic, so files already written are the ones that would be written again).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from brainsynth import conventions
from brainsynth.cohort.anatomy import TEMPLATE_NAME, Grid, make_grid
from brainsynth.cohort.simulate import SimulatedSubject, simulate_subject
from brainsynth.conventions import (
    LAYOUT_LABELS,
    LAYOUT_SUFFIXES,
    LAYOUTS,
    MODALITIES,
    MSD_CHANNELS,
    PATHOLOGIES,
    canonical_pathology,
)
from brainsynth.engine.io import atomic_write_text, save_nifti

#: bump when a seed's output changes, so an old cohort on disk is not mistaken for a current one
COHORT_FORMAT_VERSION = 2
DATALIST_NAME = "datalist.json"
#: written before the first subject: the parameters of a generation in progress (for resuming)
MARKER_NAME = ".brainsynth_cohort.json"
LOCK_NAME = ".brainsynth_cohort.lock"
BRAIN_MASK_SUFFIX = "brain_mask"
SPLIT_FRACTIONS = {"validation": 0.15, "test": 0.15}
#: MSD Task01's own channel names (dataset.json "modality") for the canonical channels
_MSD_CHANNEL_NAMES = {"flair": "FLAIR", "t1w": "T1w", "t1ce": "t1gd", "t2w": "T2w"}
_MSD_LABEL_NAMES = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


class CohortError(ValueError):
    """Invalid cohort parameters, or a folder holding a different cohort."""


def subject_id(layout: str, index: int) -> str:
    """Subject identifier in the style of the real release (index 0 -> the release's first id)."""
    if layout == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    raise CohortError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")


def subject_files(layout: str, sid: str) -> dict[str, str]:
    """Relative path of every file of one subject, by role (canonical modality, image4d, seg, brain_mask)."""
    if layout == "msd":
        return {
            "image4d": f"imagesTr/{sid}.nii.gz",
            "pd": f"pdTr/{sid}.nii.gz",
            "seg": f"labelsTr/{sid}.nii.gz",
            "brain_mask": f"masksTr/{sid}.nii.gz",
        }
    roles = [*LAYOUT_SUFFIXES[layout], BRAIN_MASK_SUFFIX]
    return {role: f"{sid}/{conventions.layout_file_name(sid, role, layout)}" for role in roles}


def row_label_convention(layout: str, pathology: str) -> str:
    """Label convention of a subject's segmentation: the layout's, except for sclerosis subjects, whose lesion
    label (canonical 4) no BraTS / MSD convention has: those are written in the canonical convention."""
    return "canonical" if pathology == "sclerosis" else LAYOUT_LABELS[layout]


def encode_labels(labels: np.ndarray, convention: str) -> np.ndarray:
    """Canonical labels -> the values ``convention`` uses for them (uint8)."""
    try:
        return conventions.encode_labels(labels, convention)
    except ValueError as e:
        raise CohortError(str(e)) from None


def assign_splits(pathologies: Sequence[str], seed: int) -> dict[str, list[int]]:
    """Deterministic subject-level split (indices): shuffle each pathology's subjects, interleave the
    pathologies, and give the tail to test and the part before it to validation, so every split mixes
    pathologies. About 70 / 15 / 15; at least one validation subject from 2 subjects and one test from 3."""
    n = len(pathologies)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B1D]))
    groups = {}
    for i, p in enumerate(pathologies):
        groups.setdefault(p, []).append(i)
    queues = [list(rng.permutation(members)) for _, members in sorted(groups.items())]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(int(q.pop(0)))
    n_test = max(1, int(round(SPLIT_FRACTIONS["test"] * n))) if n >= 3 else 0
    n_val = max(1, int(round(SPLIT_FRACTIONS["validation"] * n))) if n >= 2 else 0
    n_train = n - n_val - n_test
    return {
        "training": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def _check_parameters(n_subjects, seed, layout, pathologies) -> tuple[int, int, str, list[str]]:
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise CohortError(f"n_subjects must be a positive integer, got {n_subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CohortError(f"seed must be a non-negative integer, got {seed!r}")
    if layout not in LAYOUTS:
        raise CohortError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if pathologies is None:
        pathologies = list(PATHOLOGIES)
    elif isinstance(pathologies, str):
        pathologies = [p for p in pathologies.replace(",", " ").split() if p]
    try:
        pathologies = [canonical_pathology(p) for p in pathologies]
    except ValueError as e:
        raise CohortError(str(e)) from None
    if not pathologies:
        raise CohortError("pathologies must name at least one of " + ", ".join(PATHOLOGIES))
    return int(n_subjects), int(seed), layout, pathologies


def _write_subject(out: Path, layout: str, subject: SimulatedSubject, files: dict[str, str], overwrite: bool) -> None:
    """Write one subject's files (images float32, segmentation and brain mask uint8)."""
    affine = subject.affine
    seg = encode_labels(subject.labels, row_label_convention(layout, subject.pathology))
    if layout == "msd":
        stack = np.stack([subject.images[m] for m in MSD_CHANNELS], axis=-1)
        save_nifti(stack, out / files["image4d"], affine=affine, overwrite=overwrite)
        save_nifti(subject.images["pd"], out / files["pd"], affine=affine, overwrite=overwrite)
    else:
        for m in MODALITIES:
            save_nifti(subject.images[m], out / files[m], affine=affine, overwrite=overwrite)
    save_nifti(seg, out / files["seg"], affine=affine, overwrite=overwrite, dtype=np.uint8)
    save_nifti(subject.brain_mask, out / files["brain_mask"], affine=affine, overwrite=overwrite, dtype=np.uint8)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CohortError(f"{path}: unreadable ({e}); remove it or pass overwrite=True") from None
    return content if isinstance(content, dict) else None


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} asked" for k in keys if old.get(k) != new.get(k))


def generate_cohort(
    out_dir: str | os.PathLike,
    n_subjects: int,
    seed: int = 0,
    spacing: float | Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    layout: str = "brats2023",
    pathologies: Sequence[str] | str | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Simulate ``n_subjects`` subjects into ``out_dir`` in ``layout`` and return ``<out_dir>/datalist.json``.

    ``pathologies`` (default: healthy, glioblastoma, sclerosis, dementia) are assigned in turn, subject i getting
    ``pathologies[i % len(pathologies)]`` (repeat a name to weight it). ``spacing`` / ``shape`` choose the grid
    (default the BraTS 240 x 240 x 155 at 1 mm; see ``make_grid``). Subject i is simulated from seed
    ``(seed, i)``: the same call gives identical files.
    """
    n_subjects, seed, layout, pathologies = _check_parameters(n_subjects, seed, layout, pathologies)
    try:
        grid = make_grid(spacing, shape)
    except ValueError as e:
        raise CohortError(str(e)) from None
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CohortError(f"{out}: exists and is not a folder")
    parameters = {
        "generator": "brainsynth.cohort",
        "format_version": COHORT_FORMAT_VERSION,
        "n_subjects": n_subjects,
        "seed": seed,
        "layout": layout,
        "pathologies": pathologies,
        "shape": list(grid.shape),
        "spacing": [float(s) for s in grid.spacing],
    }
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):  # two processes asking for the same demo cohort: the second waits, then reuses it
        return _generate(out, parameters, grid, overwrite, verbose)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock
        yield
        return
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(out: Path, parameters: dict[str, Any], grid: Grid, overwrite: bool, verbose: bool) -> Path:
    n_subjects, seed, layout = parameters["n_subjects"], parameters["seed"], parameters["layout"]
    pathologies = parameters["pathologies"]
    datalist_path = out / DATALIST_NAME
    marker_path = out / MARKER_NAME
    existing = _read_json(datalist_path)
    previous = (existing or {}).get("parameters") if existing is not None else (_read_json(marker_path) or None)
    if existing is not None and previous is None and not overwrite:
        raise CohortError(
            f"{datalist_path}: a datalist not written by brainsynth.cohort; choose another folder "
            "or pass overwrite=True"
        )
    if previous is not None and previous != parameters and not overwrite:
        raise CohortError(
            f"{out}: holds a different cohort ({_differences(previous, parameters)}); choose "
            "another folder or pass overwrite=True"
        )
    ids = [subject_id(layout, i) for i in range(n_subjects)]
    files = {sid: subject_files(layout, sid) for sid in ids}
    if existing is not None and previous == parameters:
        missing = [str(out / f) for sid in ids for f in files[sid].values() if not (out / f).is_file()]
        if not missing:
            return datalist_path
        if not overwrite:
            raise CohortError(
                f"{out}: the cohort's datalist is there but {len(missing)} of its files are not "
                f"(first: {missing[0]}); pass overwrite=True to rebuild it"
            )
    resume = previous == parameters
    replace = overwrite or resume  # rewriting a file of the same deterministic cohort changes nothing
    atomic_write_text(marker_path, json.dumps(parameters, indent=1), overwrite=replace)

    for i, sid in enumerate(ids):
        pathology = pathologies[i % len(pathologies)]
        if resume and not overwrite and all((out / f).is_file() for f in files[sid].values()):
            continue
        start = time.perf_counter()
        subject = simulate_subject(pathology, seed=(seed, i), grid=grid)
        _write_subject(out, layout, subject, files[sid], overwrite=replace)
        if verbose:
            print(f"{sid} {pathology:12s} {time.perf_counter() - start:6.2f} s", flush=True)

    rows = []
    for i, sid in enumerate(ids):
        pathology = pathologies[i % len(pathologies)]
        row = {"subject": sid, "pathology": pathology, "label_convention": row_label_convention(layout, pathology)}
        row.update(files[sid])
        if layout == "msd":
            row["image4d_channels"] = list(MSD_CHANNELS)
        rows.append(row)
    splits = assign_splits([r["pathology"] for r in rows], seed)
    datalist: dict[str, Any] = {
        "description": "Simulated BraTS-like cohort from brainsynth.cohort: MNI ICBM152 anatomy with random "
        "deformation, pathology models, spin-echo / inversion-recovery contrasts, Rician noise "
        "and bias field. No patient data. Each row's label_convention says how its seg is "
        "numbered (lesion subjects use 'canonical': 4 = lesion).",
        "layout": layout,
        "label_convention": LAYOUT_LABELS[layout],
        "seed": seed,
        "grid": grid.to_json(),
        "template": TEMPLATE_NAME,
        "modalities": list(MODALITIES),
        "parameters": parameters,
    }
    if layout == "msd":
        datalist["image4d_channels"] = list(MSD_CHANNELS)
        _write_msd_dataset_json(out, rows, replace)
    for split, members in splits.items():
        datalist[split] = [rows[i] for i in members]
    atomic_write_text(datalist_path, json.dumps(datalist, indent=1), overwrite=replace)
    return datalist_path


def _write_msd_dataset_json(out: Path, rows: list[dict], overwrite: bool) -> None:
    content = {
        "name": "BRATS (simulated by brainsynth.cohort)",
        "description": "Simulated subjects in the MSD Task01_BrainTumour layout. Extras not in MSD: pdTr/ "
        "(proton density) and masksTr/ (brain masks). Sclerosis subjects' labels use value 4 for "
        "lesions (see datalist.json).",
        "reference": "brainsynth simulated cohort",
        "licence": "generated data, no patient information",
        "tensorImageSize": "4D",
        "modality": {str(i): _MSD_CHANNEL_NAMES[m] for i, m in enumerate(MSD_CHANNELS)},
        "labels": dict(_MSD_LABEL_NAMES),
        "numTraining": len(rows),
        "numTest": 0,
        "training": [{"image": f"./{r['image4d']}", "label": f"./{r['seg']}"} for r in rows],
        "test": [],
    }
    path = out / "dataset.json"
    atomic_write_text(path, json.dumps(content, indent=1), overwrite=overwrite)


def subject_regions(datalist_path: str | Path, subject: str, purity: float | None = None) -> dict[str, np.ndarray]:
    """Ground-truth regions of one subject of a cohort written by ``generate_cohort`` (``SimulatedSubject.regions``:
    "wm", "gm", "csf" where that tissue fills ``purity`` of a voxel, and every label present), on the cohort's
    grid. The files hold no tissue map, so the subject is simulated again from the datalist's parameters
    (deterministic: the same brain as its files)."""
    path = Path(datalist_path)
    datalist = _read_json(path)
    parameters = (datalist or {}).get("parameters")
    if not parameters or parameters.get("generator") != "brainsynth.cohort":
        raise CohortError(f"{path}: not a datalist written by brainsynth.cohort, so it has no ground-truth regions")
    ids = [subject_id(parameters["layout"], i) for i in range(parameters["n_subjects"])]
    if subject not in ids:
        raise CohortError(f"{path}: no subject {subject!r} in this cohort (first: {ids[0]})")
    index = ids.index(subject)
    pathology = parameters["pathologies"][index % len(parameters["pathologies"])]
    grid = make_grid(parameters["spacing"], parameters["shape"])
    simulated = simulate_subject(pathology, seed=(parameters["seed"], index), grid=grid)
    return simulated.regions() if purity is None else simulated.regions(purity)

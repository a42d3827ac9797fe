"""Dataset discovery: any supported layout -> a list of canonical MONAI data dicts.

A canonical row is ``{"subject", <modality>: path, ..., "seg"?, "brain_mask"?, "pathology"?, "label_convention",
"layout", "split"?}`` with canonical modality keys (brainsynth.conventions.MODALITIES) and absolute paths
(a path may be a NIfTI file or a folder holding one DICOM series). MSD rows carry ``"image4d"`` (one 4-D file)
and ``"image4d_channels"`` (canonical modality of each channel) instead of per-modality paths. Missing files are
simply absent keys (BraSyn validation cases lack one modality and the segmentation); ``check`` reports them.
``label_convention`` names the source labelling (brainsynth.conventions.LABEL_CONVENTIONS); LoadSubjectd maps
it to canonical labels, so rows of different datasets can be mixed.

Layouts, tried in this order for a folder:
  1. ``datalist.json`` / ``datalist.csv`` inside it (e.g. the simulated cohort) - an explicit datalist;
  2. ``dataset.json`` (MSD Task01: 4-D images, channel names and labels from the file);
  3. a scan for subject folders of ``<subject>[-_]<suffix>.nii[.gz]`` files (BraTS 2021: t1/t1ce/t2/flair,
     BraTS 2023 GLI / BraSyn / PEDs: t1n/t1c/t2w/t2f) or ``<suffix>`` sub-folders of DICOM slices.
A path to a ``.json`` or ``.csv`` file is read as an explicit datalist.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from brainsynth.conventions import (
    MODALITIES,
    MSD_CHANNELS,
    canonical_modality,
    canonical_pathology,
)
from brainsynth.conventions import (
    label_convention as get_label_convention,
)
from brainsynth.data.dicom import is_dicom_series
from brainsynth.data.errors import DatasetError

SPLITS: tuple[str, ...] = ("training", "validation", "test")
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
DATALIST_NAMES: tuple[str, ...] = ("datalist.json", "datalist.csv")

_SEG_KEYS = {"seg": "seg", "label": "seg", "labels": "seg", "segmentation": "seg"}
_BRAIN_MASK_KEYS = {"brain_mask": "brain_mask", "brainmask": "brain_mask"}
_SUBJECT_KEYS = ("subject", "subject_id", "case", "case_id", "id")
# file-name suffixes naming a segmentation or brain mask in a folder scan
_FILE_ROLE_SUFFIXES = {"seg": "seg", "brain_mask": "brain_mask", "brainmask": "brain_mask"}
# file-name suffixes only BraTS 2023-style releases use (2021 uses t1 / t1ce / t2 / flair)
_BRATS2023_SUFFIXES = {"t1n", "t1c", "t2f"}
_BRATS2021_SUFFIXES = {"t1", "t1ce", "t2", "flair"}
# MSD dataset.json label names -> canonical label value; the result must match the "msd" convention
_MSD_LABEL_WORDS = (
    ("non-enhancing", 1),
    ("non enhancing", 1),
    ("necro", 1),
    ("edema", 2),
    ("oedema", 2),
    ("enhancing", 3),
    ("background", 0),
)


# --- file names ---------------------------------------------------------------------------------------------
def strip_nifti_extension(name: str) -> str | None:
    """``'a-t1n.nii.gz' -> 'a-t1n'``; None when the name is not a NIfTI file."""
    low = name.lower()
    for ext in NIFTI_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


@functools.lru_cache(maxsize=1)
def _suffix_table() -> tuple[tuple[str, str], ...]:
    """(lower-case suffix, role) pairs, longest first so 't1ce' wins over 't1'."""
    from brainsynth.conventions import MODALITY_SYNONYMS  # the one synonym table; read, never copied

    table = dict(MODALITY_SYNONYMS)
    table.update(_FILE_ROLE_SUFFIXES)
    return tuple(sorted(table.items(), key=lambda kv: -len(kv[0])))


def parse_scan_name(stem: str) -> tuple[str, str, str] | None:
    """Split ``'<prefix>[-_]<suffix>'`` into (prefix, role, raw suffix); role is a modality, 'seg' or
    'brain_mask'. A bare ``'<suffix>'`` (e.g. a DICOM folder called ``FLAIR``) gives prefix ''."""
    low = stem.lower()
    for suffix, role in _suffix_table():
        if low == suffix:
            return "", role, suffix
        for sep in ("-", "_", "."):
            if low.endswith(sep + suffix):
                return stem[: -len(suffix) - 1], role, suffix
    return None


def subject_from_path(path: str | os.PathLike) -> str | None:
    """The subject id a file name announces (``BraTS-GLI-00001-000-t1n.nii.gz -> BraTS-GLI-00001-000``)."""
    name = Path(path).name
    stem = strip_nifti_extension(name) or name
    parsed = parse_scan_name(stem)
    return parsed[0] if parsed and parsed[0] else None


def layout_of_files(paths: Iterable[str | os.PathLike | None]) -> str | None:
    """The dataset layout the names of one subject's files follow (``brats2021``, ``brats2023``, ...), or None
    when no name parses (e.g. ``t1.nii.gz``)."""
    parsed = []
    for p in paths:
        if p:
            name = Path(p).name
            hit = parse_scan_name(strip_nifti_extension(name) or name)
            if hit:
                parsed.append(hit)
    if not parsed:
        return None
    return _brats_layout(parsed[0][0], {raw for _, _, raw in parsed})[0]


def output_layout_of(row: Mapping[str, Any], chosen: str | None = None) -> str:
    """The BraTS naming (``brats2021`` / ``brats2023``) a row's generated files take, one rule for every bundle:
    ``chosen`` when given; else the row's dataset layout when it is a BraTS one; else the naming its own files
    follow (a datalist, MSD or DICOM rows of BraTS-named files keep that naming: ``_t1ce`` stays BraTS 2021);
    else BraTS 2023. A file is a path or a loaded MetaTensor (its source file)."""
    from brainsynth.conventions import LAYOUT_SEPARATORS, output_layout

    if chosen:
        return output_layout(chosen)
    layout = row.get("layout")
    if layout not in LAYOUT_SEPARATORS:
        files = []
        for key in (*MODALITIES, "seg", "mask", "brain_mask", "image", "image4d", "source"):
            value = row.get(key)
            value = getattr(value, "meta", {}).get("filename_or_obj", value) if hasattr(value, "meta") else value
            if isinstance(value, (str, os.PathLike)) and str(value):
                files.append(value)
        layout = layout_of_files(files)
    return output_layout(layout)


# --- label conventions and pathologies per layout -------------------------------------------------------------
def _brats_layout(prefix: str, suffixes: set[str]) -> tuple[str, str, str | None]:
    """(layout name, label convention, pathology) for a BraTS-style subject."""
    upper = prefix.upper()
    if upper.startswith("BRATS-PED"):
        return "brats-peds", "peds2024", "glioblastoma"
    if suffixes & _BRATS2023_SUFFIXES or upper.startswith("BRATS-"):
        # GLI (adult glioma), SSA (sub-Saharan glioma) are gliomas; MEN / MET tumours are not glioblastoma
        pathology = None if upper.startswith(("BRATS-MEN", "BRATS-MET")) else "glioblastoma"
        return "brats2023", "brats2023", pathology
    if upper.startswith("BRATS") or suffixes <= _BRATS2021_SUFFIXES | {"seg"}:
        return "brats2021", "brats2021", "glioblastoma"
    # generic '<subject>_<modality>' files: nothing says how the labels are numbered
    return "folders", "canonical", None


# --- folder scan ----------------------------------------------------------------------------------------------
def _scan_folder(root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        scans: list[tuple[str, str, str, Path]] = []  # (prefix, role, suffix, path)
        for name in sorted(filenames):
            stem = strip_nifti_extension(name)
            parsed = parse_scan_name(stem) if stem else None
            if parsed:
                scans.append((*parsed, here / name))
        dicom_dirs = []
        for name in list(dirnames):
            parsed = parse_scan_name(name)
            if parsed and parsed[1] != "brain_mask" and is_dicom_series(here / name):
                dicom_dirs.append((*parsed, here / name))
                dirnames.remove(name)  # a series folder is a leaf
        if not scans and not dicom_dirs:
            continue
        prefixes = {p for p, *_ in scans + dicom_dirs if p}
        if len(prefixes) <= 1 or here.name in prefixes:
            # one subject folder; files naming another subject stay in it so that `check` can report them
            subject = here.name if here.name in prefixes or not prefixes else prefixes.pop()
            groups = {subject: scans + dicom_dirs}
        else:  # flat folder of several subjects' files
            groups = {}
            for scan in scans + dicom_dirs:
                groups.setdefault(scan[0] or here.name, []).append(scan)
        for subject, members in groups.items():
            rows.append(_row_from_scans(subject, members))
    if not rows:
        raise DatasetError(
            f"{root}: no dataset found (no datalist.json / dataset.json, and no "
            "'<subject>_<modality>.nii.gz' files such as BraTS's *-t1n.nii.gz or *_t1.nii.gz)"
        )
    rows.sort(key=lambda r: r["subject"])
    return rows


def _row_from_scans(subject: str, members: list[tuple[str, str, str, Path]]) -> dict[str, Any]:
    row: dict[str, Any] = {"subject": subject}
    for prefix, role, suffix, path in sorted(members, key=lambda m: str(m[3])):
        if role in row:
            raise DatasetError(
                f"{path}: second file for {role} of subject {subject} (already {Path(row[role]).name}); keep one"
            )
        row[role] = str(path.resolve())
    layout, convention, pathology = _brats_layout(subject, {m[2] for m in members})
    row["label_convention"] = convention
    row["layout"] = layout
    if pathology:
        row["pathology"] = pathology
    return row


# --- explicit datalists ----------------------------------------------------------------------------------------
def _resolve(value: Any, base: Path) -> str:
    p = Path(str(value)).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _canonical_row(
    raw: dict[str, Any], base: Path, where: str, image4d_channels: list[str] | None, defaults: dict[str, Any]
) -> dict[str, Any]:
    """One datalist row -> canonical keys. ``where`` names the datalist file and row for error messages."""
    row: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    image = modality = None
    for key, value in raw.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        k = str(key).strip().lower()
        if k == "image":
            image = value
        elif k == "modality":
            modality = value
        elif k in _SEG_KEYS:
            row["seg"] = _resolve(value, base)
        elif k in _BRAIN_MASK_KEYS:
            row["brain_mask"] = _resolve(value, base)
        elif k in _SUBJECT_KEYS and "subject" not in row:
            row["subject"] = str(value)
        elif k == "pathology":
            try:
                row["pathology"] = canonical_pathology(value)
            except ValueError as e:
                raise DatasetError(f"{where}: {e}") from None
        elif k == "split":
            if value not in SPLITS:
                raise DatasetError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
            row["split"] = value
        elif k == "label_convention":
            try:
                row["label_convention"] = get_label_convention(value).name
            except ValueError as e:
                raise DatasetError(f"{where}: {e}") from None
        elif k == "image4d_channels":
            image4d_channels = list(value)
        elif k == "image4d":
            image = value
            modality = modality or "4d"
        else:
            try:
                m = canonical_modality(k)
            except ValueError:
                extra[key] = value  # unknown fields travel along untouched
                continue
            if m in row:
                raise DatasetError(f"{where}: two entries for {m} ({row[m]} and {value})")
            row[m] = _resolve(value, base)
    if image is not None:
        if modality in (None, "4d"):
            if not image4d_channels:
                raise DatasetError(
                    f"{where}: 'image' without a 'modality' field; add one (t1w, t1ce, t2w, "
                    "flair, pd or a synonym), or image4d_channels for a 4-D file"
                )
            row["image4d"] = _resolve(image, base)
            try:
                row["image4d_channels"] = [canonical_modality(c) for c in image4d_channels]
            except ValueError as e:
                raise DatasetError(f"{where}: image4d_channels: {e}") from None
        else:
            try:
                m = canonical_modality(modality)
            except ValueError as e:
                raise DatasetError(f"{where}: {e}") from None
            if m in row:
                raise DatasetError(f"{where}: two entries for {m} ({row[m]} and {image})")
            row[m] = _resolve(image, base)
    elif modality is not None:
        raise DatasetError(f"{where}: 'modality' given without an 'image' path")
    if not any(m in row for m in MODALITIES) and "image4d" not in row:
        raise DatasetError(
            f"{where}: no image path (expected modality columns such as t1w / t1n / flair, or 'image' with 'modality')"
        )
    if "subject" not in row:
        first = row.get("image4d") or next(row[m] for m in MODALITIES if m in row)
        name = Path(first).name
        row["subject"] = subject_from_path(first) or strip_nifti_extension(name) or name
    for key, value in defaults.items():
        row.setdefault(key, value)
    row.update({k: v for k, v in extra.items() if k not in row})
    return row


def _merge_scan_rows(rows: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-scan rows (one image each) of the same subject become one subject row."""
    merged: dict[str, dict[str, Any]] = {}
    for where, row in rows:
        subject = row["subject"]
        if subject not in merged:
            merged[subject] = dict(row)
            continue
        target = merged[subject]
        for key, value in row.items():
            if key in target and target[key] != value:
                raise DatasetError(
                    f"{where}: subject {subject} already has {key} = {target[key]!r}, this row says {value!r}"
                )
            target[key] = value
    return list(merged.values())


def _msd_convention(labels: dict[str, str], where: str) -> str:
    """Check an MSD dataset.json 'labels' table against the 'msd' convention (the only MSD one we map)."""
    expected = get_label_convention("msd").to_canonical
    for value, name in labels.items():
        low = str(name).lower()
        canonical = next((c for word, c in _MSD_LABEL_WORDS if word in low), None)
        if canonical is None or expected.get(int(value)) != canonical:
            raise DatasetError(
                f"{where}: label {value} = {name!r} does not follow the MSD Task01 convention "
                "(1 edema, 2 non-enhancing tumour, 3 enhancing tumour); pass label_convention"
            )
    return "msd"


def read_datalist(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an explicit datalist (JSON: a list of rows, a {training, validation, test} dict, or an MSD
    dataset.json; CSV: one row per subject or per scan) into canonical rows; relative paths are relative to
    the datalist's folder."""
    path = Path(path).resolve()
    base = path.parent
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as fh:
                content: Any = list(csv.DictReader(fh))
        else:
            content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot be read as a datalist ({e})") from None
    defaults: dict[str, Any] = {"layout": "datalist"}
    channels = None
    msd = isinstance(content, dict) and isinstance(content.get("modality"), dict)
    if isinstance(content, dict):
        if msd:
            order = sorted(content["modality"], key=lambda k: int(k))
            try:
                channels = [canonical_modality(content["modality"][k]) for k in order]
            except ValueError as e:
                raise DatasetError(f"{path}: modality table: {e}") from None
            defaults.update(
                layout="msd",
                pathology="glioblastoma",
                label_convention=_msd_convention(content.get("labels", {}), str(path)),
            )
        else:
            if content.get("layout") == "msd":
                channels = list(content.get("image4d_channels", MSD_CHANNELS))
            if content.get("layout"):
                defaults["layout"] = str(content["layout"])
        if content.get("label_convention") and "label_convention" not in defaults:
            try:
                defaults["label_convention"] = get_label_convention(content["label_convention"]).name
            except ValueError as e:
                raise DatasetError(f"{path}: {e}") from None
        if "label_convention" not in defaults and defaults["layout"] in ("brats2021", "brats2023", "msd"):
            defaults["label_convention"] = defaults["layout"]
        sections = [s for s in SPLITS if isinstance(content.get(s), list)]
        if not sections:
            raise DatasetError(f"{path}: a datalist object needs a 'training', 'validation' or 'test' list")
        raw_rows = []
        for split in sections:
            for i, raw in enumerate(content[split]):
                if isinstance(raw, str):  # MSD lists test images as bare paths
                    raw = {"image": raw}
                if not isinstance(raw, dict):
                    raise DatasetError(f"{path}: {split}[{i}] is not an object")
                raw = dict(raw)
                # MSD's "training" is simply all labelled cases, not a split; its "test" cases are unlabelled
                if not msd or split == "test":
                    raw.setdefault("split", split)
                raw_rows.append((f"{path}: {split}[{i}]", raw))
    elif isinstance(content, list):
        raw_rows = [
            (f"{path}: row {i + (2 if path.suffix.lower() == '.csv' else 0)}", r) for i, r in enumerate(content)
        ]
        for where, raw in raw_rows:
            if not isinstance(raw, dict):
                raise DatasetError(f"{where}: is not an object")
    else:
        raise DatasetError(f"{path}: a datalist must be a list of rows or an object of split lists")
    defaults.setdefault("label_convention", "canonical")
    rows = [(where, _canonical_row(raw, base, where, channels, defaults)) for where, raw in raw_rows]
    if not rows:
        raise DatasetError(f"{path}: the datalist has no rows")
    return _merge_scan_rows(rows)


# --- entry point -----------------------------------------------------------------------------------------------
def discover(
    path: str | os.PathLike, label_convention: str | None = None, pathology: str | None = None
) -> list[dict[str, Any]]:
    """Canonical rows for the dataset at ``path`` (a folder in any supported layout, or a datalist file).

    ``label_convention`` overrides the inferred one for every row (e.g. ``"brats2023"`` for a PEDs release
    numbered like GLI); ``pathology`` fills rows the dataset does not label. Only file names are read here;
    ``validate_items`` opens the files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: dataset path does not exist")
    if path.is_file():
        if path.suffix.lower() not in (".json", ".csv"):
            raise DatasetError(f"{path}: not a dataset folder or a .json / .csv datalist")
        rows = read_datalist(path)
    else:
        found = [path / n for n in DATALIST_NAMES if (path / n).is_file()]
        if found:
            rows = read_datalist(found[0])
        elif (path / "dataset.json").is_file():
            rows = read_datalist(path / "dataset.json")
        else:
            rows = _scan_folder(path)
    if label_convention is not None:
        name = get_label_convention(label_convention).name
        for row in rows:
            row["label_convention"] = name
    if pathology is not None:
        fill = canonical_pathology(pathology)
        for row in rows:
            row.setdefault("pathology", fill)
    return [_ordered(row) for row in rows]


_KEY_ORDER = (
    "subject",
    *MODALITIES,
    "image4d",
    "image4d_channels",
    "seg",
    "brain_mask",
    "pathology",
    "label_convention",
    "layout",
    "split",
)


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    """Same row, keys in one readable order (canonical keys first, extra datalist fields last)."""
    return {**{k: row[k] for k in _KEY_ORDER if k in row}, **{k: v for k, v in row.items() if k not in _KEY_ORDER}}


def resolve_dataset_dir(
    dataset_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, **cohort_kwargs: Any
) -> Path:
    """The dataset location a bundle should read: ``"demo"`` -> the simulated cohort (built in ``cache_dir`` on
    first use, reused afterwards), anything else -> that existing path. A missing path is an error, never a
    silent switch to simulated data.

    The cohort goes to ``<cache_dir>/demo-<hash of cohort_kwargs>`` so different settings never share files;
    ``cache_dir`` defaults to ``$BRAINSYNTH_CACHE`` or ``~/.cache/brainsynth``; ``n_subjects`` defaults to 8.
    """
    if str(dataset_dir) != "demo":
        path = Path(dataset_dir).expanduser()
        if not path.exists():
            raise DatasetError(
                f"{path}: dataset_dir does not exist (set dataset_dir to your data, or to 'demo' "
                "for the simulated cohort)"
            )
        return path
    import hashlib

    from brainsynth.cohort import generate_cohort  # imported only when a demo is wanted
    from brainsynth.cohort.layout import COHORT_FORMAT_VERSION

    cohort_kwargs.setdefault("n_subjects", 8)
    if cache_dir is None:
        cache_dir = os.environ.get("BRAINSYNTH_CACHE", "~/.cache/brainsynth")
    # the simulator's format version is part of the key: a newer simulator gets a fresh folder, never stale files
    key = json.dumps({**cohort_kwargs, "format_version": COHORT_FORMAT_VERSION}, sort_keys=True, default=str)
    out_dir = Path(cache_dir).expanduser() / f"demo-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    # always ask the generator: it reuses a matching cohort cheaply, and rebuilds nothing silently when the
    # simulator's format version or the parameters changed (it raises instead of serving stale files)
    generate_cohort(out_dir, **cohort_kwargs)
    return out_dir

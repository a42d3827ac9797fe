"""Working with canonical rows: where a modality's voxels live, deterministic splits, per-scan rows."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Sequence

from brainsynth.conventions import MODALITIES, canonical_modality
from brainsynth.data.discover import SPLITS
from brainsynth.data.errors import DatasetError

#: default hash-split fractions (training, validation, test) for datasets that carry no split of their own
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


def image_source(row: dict[str, Any], key: str) -> tuple[str, int | None] | None:
    """``(path, channel)`` holding ``key``'s voxels in ``row``: a per-key path (channel ``row[key + '_channel']``
    when a per-scan row points into a 4-D file), or a channel of the row's MSD ``image4d``; None if absent."""
    value = row.get(key)
    if value is not None and not (isinstance(value, str) and not value):  # a path (or data loaded already)
        return (str(value) if isinstance(value, (str, os.PathLike)) else value), row.get(f"{key}_channel")
    channels = row.get("image4d_channels")
    if row.get("image4d") and channels and key in channels:
        return str(row["image4d"]), list(channels).index(key)
    return None


def available_modalities(row: dict[str, Any]) -> list[str]:
    """Canonical modalities present in a subject row (or the one modality of a per-scan row), canonical order."""
    if "image" in row and "modality" in row:
        return [canonical_modality(row["modality"])]
    return [m for m in MODALITIES if image_source(row, m) is not None]


def _hash_split(subject: str, fractions: Sequence[float]) -> str:
    # sha256 of the id, not Python's salted hash(): the same subject lands in the same split on every machine
    u = int(hashlib.sha256(str(subject).encode()).hexdigest()[:16], 16) / 2.0**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def split_of(row: dict[str, Any], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The row's own split when the datalist gave one, else a deterministic hash of its subject id (so all
    scans of a subject share a split)."""
    return row["split"] if row.get("split") else _hash_split(row["subject"], fractions)


def split_items(
    items: Iterable[dict[str, Any]],
    split: str,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """Rows of ``split`` ("training" / "validation" / "test"), in their original order.

    A row's own ``split`` (from a datalist) wins; other rows are split by a hash of the subject id with
    ``fractions``. An empty result is an error unless ``allow_empty`` (a bundle should not silently train or
    evaluate on nothing).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    items = list(items)
    chosen = [row for row in items if split_of(row, fractions) == split]
    if not chosen and not allow_empty:
        raise DatasetError(
            f"no subjects in split {split!r} ({len(items)} rows in all; fractions "
            f"{tuple(fractions)}); add subjects, give rows a 'split', or change the fractions"
        )
    return chosen


def select_split(
    items: Iterable[dict[str, Any]],
    split: str | Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """The rows a run works on, by the one ``split`` key every bundle takes: ``"all"`` (every row), one of
    "training" / "validation" / "test", or a list of those. An empty result is an error naming the choice,
    unless ``allow_empty`` (for optional extras such as a validation measurement)."""
    items = list(items)
    names = [split] if isinstance(split, str) else list(split)
    unknown = [n for n in names if n != "all" and n not in SPLITS]
    if unknown or not names:
        raise ValueError(f"split {split!r}: use 'all', one of {', '.join(SPLITS)}, or a list of those")
    if "all" in names:
        if not items:
            raise DatasetError("no subjects found (split 'all'); check dataset_dir")
        return items
    chosen = [row for row in items if split_of(row, fractions) in names]
    if not chosen and not allow_empty:
        raise DatasetError(
            f"no subjects in split {split!r} ({len(items)} rows in all); use split 'all' for a folder of your own "
            "subjects, give rows a 'split', or add subjects"
        )
    return chosen


def expand_scans(
    items: Iterable[dict[str, Any]], modalities: Sequence[str] | None = None, require_pathology: bool = True
) -> list[dict[str, Any]]:
    """One row per scan: ``{"image", "modality", "pathology", "subject"}`` (+ ``"image_channel"`` for a channel
    of a 4-D file, + ``"split"`` when the subject row has one), for each canonical modality present (limited to
    ``modalities`` if given), in canonical modality order. Load them with ``LoadSubjectd(keys="image")``."""
    wanted = list(MODALITIES) if modalities is None else [canonical_modality(m) for m in modalities]
    scans, unlabelled = [], []
    for row in items:
        if require_pathology and not row.get("pathology"):
            unlabelled.append(str(row.get("subject")))
            continue
        for m in MODALITIES:
            source = image_source(row, m) if m in wanted else None
            if source is None:
                continue
            scan = {"image": source[0], "modality": m, "pathology": row.get("pathology"), "subject": row["subject"]}
            if source[1] is not None:
                scan["image_channel"] = source[1]
            if row.get("split"):
                scan["split"] = row["split"]
            scans.append(scan)
    if unlabelled:
        raise DatasetError(
            f"subjects without a pathology: {', '.join(unlabelled[:10])}"
            f"{' ...' if len(unlabelled) > 10 else ''}; give the datalist a 'pathology' column "
            "or pass discover(..., pathology=...)"
        )
    return scans

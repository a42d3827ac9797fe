"""Canonical names shared by every bundle: modalities, tumour labels, pathologies and dataset layouts.

Every dataset convention (BraTS 2021, BraTS 2023 GLI / BraSyn / PEDs, MSD Task01, explicit datalists) is
mapped onto the canonical sets below as soon as data is discovered, so no bundle ever sees a source-specific
name or label value. Sources: ../shared/reference/FACTS.md section 4.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- modalities -------------------------------------------------------------------------------------------
#: canonical modality keys, in the order used whenever several are stacked as channels
MODALITIES: tuple[str, ...] = ("t1w", "t1ce", "t2w", "flair", "pd")

#: the four BraTS contrasts, in canonical channel order
BRATS_MODALITIES: tuple[str, ...] = ("t1w", "t1ce", "t2w", "flair")


def _synonyms(spellings: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """{spelling: canonical} from {canonical: its other spellings} (each canonical key also names itself)."""
    return {alias: key for key, aliases in spellings.items() for alias in (key, *aliases)}


def _canonical(name: str, synonyms: dict[str, str], kind: str, valid: str, space: str) -> str:
    key = str(name).strip().lower().replace(" ", space)
    if key not in synonyms:
        raise ValueError(f"unknown {kind} {name!r}; valid: {valid}")
    return synonyms[key]


MODALITY_SYNONYMS: dict[str, str] = _synonyms(
    {
        "t1w": ("t1", "t1n", "t1-weighted", "t1native"),
        "t1ce": ("t1c", "t1gd", "t1-gd", "t1post", "t1_gd"),
        "t2w": ("t2", "t2-weighted"),
        "flair": ("t2f", "t2flair", "t2-flair"),
        "pd": ("pdw", "proton-density"),
    }
)


def canonical_modality(name: str) -> str:
    """Map any known modality spelling (t1n, T1-Gd, t2f, ...) to its canonical key; unknown names are an error."""
    hint = f"{', '.join(MODALITIES)} (or a synonym such as t1n, t1c, t1gd, t2f)"
    return _canonical(name, MODALITY_SYNONYMS, "modality", hint, space="")


# --- pathologies ------------------------------------------------------------------------------------------
PATHOLOGIES: tuple[str, ...] = ("healthy", "glioblastoma", "sclerosis", "dementia")

PATHOLOGY_SYNONYMS: dict[str, str] = _synonyms(
    {
        "healthy": ("normal", "control", "hc"),
        "glioblastoma": ("gbm", "glioma", "tumour", "tumor"),
        "sclerosis": ("ms", "multiple_sclerosis", "multiple-sclerosis"),
        "dementia": ("ad", "alzheimer", "alzheimers"),
    }
)


def canonical_pathology(name: str) -> str:
    return _canonical(name, PATHOLOGY_SYNONYMS, "pathology", ", ".join(PATHOLOGIES), space="_")


# --- labels -----------------------------------------------------------------------------------------------
#: canonical segmentation labels (value -> name)
LABELS: dict[int, str] = {
    0: "background",
    1: "necrotic_core",  # necrotic / non-enhancing tumour core (BraTS NCR/NET)
    2: "edema",  # peritumoural edema (BraTS ED)
    3: "enhancing",  # enhancing tumour (BraTS ET)
    4: "lesion",  # white-matter lesion (multiple sclerosis)
}
LABEL_VALUES: dict[str, int] = {v: k for k, v in LABELS.items()}


@dataclass(frozen=True)
class LabelConvention:
    """A source labelling scheme and how its values map onto the canonical labels."""

    name: str
    to_canonical: dict[int, int]
    description: str

    @property
    def valid_values(self) -> set[int]:
        return set(self.to_canonical)


LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    "canonical": LabelConvention("canonical", {k: k for k in LABELS}, "0 bg, 1 NCR, 2 ED, 3 ET, 4 lesion"),
    "brats2021": LabelConvention("brats2021", {0: 0, 1: 1, 2: 2, 4: 3}, "BraTS 2021: 1 NCR, 2 ED, 4 ET"),
    "brats2023": LabelConvention("brats2023", {0: 0, 1: 1, 2: 2, 3: 3}, "BraTS 2023 GLI/BraSyn: 1 NCR, 2 ED, 3 ET"),
    # BraTS-PEDs 2024: 1 ET, 2 NET, 3 cyst, 4 ED. Non-enhancing tumour and cyst both become the canonical core.
    "peds2024": LabelConvention(
        "peds2024", {0: 0, 1: 3, 2: 1, 3: 1, 4: 2}, "BraTS-PEDs 2024: 1 ET, 2 NET, 3 cyst, 4 ED"
    ),
    "msd": LabelConvention("msd", {0: 0, 1: 2, 2: 1, 3: 3}, "MSD Task01: 1 edema, 2 non-enhancing, 3 enhancing"),
}


def label_convention(name: str) -> LabelConvention:
    if name not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {name!r}; valid: {', '.join(LABEL_CONVENTIONS)}")
    return LABEL_CONVENTIONS[name]


# --- dataset layouts --------------------------------------------------------------------------------------
#: file suffix used by each layout for each canonical modality (and for the segmentation)
LAYOUT_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2021": {"t1w": "t1", "t1ce": "t1ce", "t2w": "t2", "flair": "flair", "pd": "pd", "seg": "seg"},
    "brats2023": {"t1w": "t1n", "t1ce": "t1c", "t2w": "t2w", "flair": "t2f", "pd": "pd", "seg": "seg"},
}
#: label convention written by each layout
LAYOUT_LABELS: dict[str, str] = {"brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd"}
#: channel order of the MSD Task01 4-D image (per its dataset.json)
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1w", "t1ce", "t2w")
LAYOUTS: tuple[str, ...] = ("brats2023", "brats2021", "msd")
#: separator between subject id and suffix in the file names of each BraTS layout
LAYOUT_SEPARATORS: dict[str, str] = {"brats2021": "_", "brats2023": "-"}


def output_layout(layout: str | None) -> str:
    """The BraTS naming outputs are written in: the input's when it is BraTS 2021 or 2023, else BraTS 2023 (MSD
    and datalists have no per-file naming of their own)."""
    return layout if layout in LAYOUT_SEPARATORS else "brats2023"


def layout_file_name(subject: str, role: str, layout: str) -> str:
    """``<subject><sep><suffix>.nii.gz`` in a BraTS layout: a canonical modality or ``seg`` gets the layout's
    suffix (BraTS 2021 ``_t1ce``, 2023 ``-t1c``), any other role is used verbatim (e.g. ``brain_mask``)."""
    if layout not in LAYOUT_SEPARATORS:
        raise ValueError(f"layout {layout!r} has no file naming; use one of {', '.join(LAYOUT_SEPARATORS)}")
    suffix = LAYOUT_SUFFIXES[layout].get(role, role)
    return f"{subject}{LAYOUT_SEPARATORS[layout]}{suffix}.nii.gz"


def encode_labels(labels, convention: str):
    """Canonical labels (array) -> the values ``convention`` gives them (uint8); a label the convention lacks is
    an error."""
    import numpy as np

    from_canonical = {c: v for v, c in label_convention(convention).to_canonical.items()}
    out = np.zeros(np.shape(labels), np.uint8)
    for value in np.unique(labels):
        if int(value) not in from_canonical:
            raise ValueError(f"label {int(value)} has no value in the {convention} convention")
        out[np.asarray(labels) == value] = from_canonical[int(value)]
    return out

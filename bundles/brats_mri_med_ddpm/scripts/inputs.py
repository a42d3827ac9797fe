"""Where the condition masks come from, how each becomes a condition label map, and the up-front input check.

Accepted inputs (``dataset_dir`` of inference / evaluation):

* one condition-mask NIfTI file, or a folder of them: a label map in the model's convention
  (BraTS variant: 0 background, 1 necrotic core, 2 edema, 3 enhancing, 4 brain - the authors' format);
* a DICOM series folder holding such a label map;
* a dataset (any layout ``brainsynth.data.discover`` reads: BraTS 2021/2023 folders, MSD, datalists): each
  subject's tumour segmentation plus its brain mask - or, when there is none, the non-zero voxels of its images;
* a mask datalist written by ``scripts.mask_augmentation.write_augmented_masks`` (``{"augmented": [...]}``)
  or any JSON ``{"masks": [{"subject", "mask"}]}``;
* ``demo``: the simulated cohort.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from brainsynth.conditioning.semantic_mask import (
    MaskError,
    RegionFromImagesd,
    SemanticMaskConditioning,
    check_mask_spacing,
)
from brainsynth.data import (
    DatasetError,
    discover,
    is_dicom_series,
    output_layout_of,
    resolve_dataset_dir,
    select_split,
)
from brainsynth.data.discover import strip_nifti_extension

MASK_LIST_KEYS = ("masks", "augmented")


def _mask_row(path: Path) -> dict[str, Any]:
    stem = strip_nifti_extension(path.name) or path.name
    return {"subject": stem, "mask": str(path.resolve())}


def _read_mask_list(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a mask datalist, or None when the JSON is an ordinary dataset datalist."""
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read as JSON ({e})") from None
    key = next((k for k in MASK_LIST_KEYS if isinstance(content, dict) and isinstance(content.get(k), list)), None)
    if key is None:
        return None
    rows = []
    for i, raw in enumerate(content[key]):
        if not isinstance(raw, dict) or not ({"mask"} <= set(raw) or {"seg"} <= set(raw)):
            raise DatasetError(f"{path}: {key}[{i}] needs a 'mask' path, or a 'seg' path (with 'brain_mask')")
        row = dict(raw)
        for k in ("mask", "seg", "brain_mask"):
            if row.get(k):
                p = Path(row[k])
                row[k] = str((p if p.is_absolute() else path.parent / p).resolve())
        row.setdefault("label_convention", content.get("label_convention", "canonical"))
        row.setdefault("subject", strip_nifti_extension(Path(row.get("mask") or row["seg"]).name))
        rows.append(row)
    return rows


def mask_rows(
    dataset_dir: str,
    cache_dir: str | None = None,
    demo_cohort: Mapping[str, Any] | None = None,
    split: str | Sequence[str] = "all",
) -> list[dict[str, Any]]:
    """Input rows for generation: ``{"subject", "mask"}`` rows or dataset rows with ``seg`` (see module doc).

    ``split`` ("all", "training", "validation", "test" or a list of those) selects dataset rows; it does not apply
    to mask files.
    """

    def pick(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        rows = [r for r in rows if r.get("seg") or r.get("mask")]
        if not rows:
            raise DatasetError(f"{where}: no subject has a segmentation to generate from")
        return select_split(rows, split)

    if str(dataset_dir) == "demo":
        root = resolve_dataset_dir("demo", cache_dir, **dict(demo_cohort or {}))
        return pick(discover(root), str(root))
    path = Path(str(dataset_dir)).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{path}: dataset_dir does not exist (a mask file, a folder of masks, a DICOM series, a "
            "dataset or datalist, or 'demo' for the simulated cohort)"
        )
    if path.is_file():
        if strip_nifti_extension(path.name) is not None:
            return [_mask_row(path)]
        if path.suffix.lower() == ".json":
            rows = _read_mask_list(path)
            if rows is not None:
                return rows
        return pick(discover(path), str(path))
    if is_dicom_series(path):
        return [{"subject": path.name, "mask": str(path.resolve())}]
    if (path / "datalist.json").is_file():
        rows = _read_mask_list(path / "datalist.json")
        if rows is not None:
            return rows
    try:
        return pick(discover(path), str(path))
    except DatasetError:
        files = sorted(p for p in path.iterdir() if strip_nifti_extension(p.name) is not None)
        series = sorted(p for p in path.iterdir() if p.is_dir() and is_dicom_series(p))
        if not files and not series:
            raise DatasetError(f"{path}: no condition masks (*.nii.gz, DICOM series) and no dataset found") from None
        return [_mask_row(p) for p in files] + [{"subject": p.name, "mask": str(p.resolve())} for p in series]


class LoadConditionMaskd(MapTransform):
    """Row -> ``{"subject", "mask": condition label map (1, X, Y, Z) MetaTensor, "source": file}``.

    A ``mask`` row is read as it is (NIfTI or DICOM series). A dataset row's segmentation is read in canonical
    labels and combined with its region masks (``region_keys``, e.g. ``{"brain": "brain_mask"}``); a missing
    region mask is derived from the non-zero voxels of the row's images (``image_keys``), as for BraTS.
    """

    def __init__(
        self,
        conditioning: SemanticMaskConditioning,
        region_keys: Mapping[str, str] | None = None,
        image_keys: Sequence[str] = (),
    ):
        super().__init__(["mask"], allow_missing_keys=True)
        from brainsynth.data import LoadSubjectd

        self.conditioning = conditioning
        self.region_keys = dict(region_keys or {})
        self.image_keys = list(image_keys)
        self._load_mask = LoadSubjectd(keys=["mask"], seg_key=None)
        self._load_seg = LoadSubjectd(keys=["seg"], seg_key="seg")
        self._load_regions = LoadSubjectd(
            keys=sorted(set(self.region_keys.values())) or ["brain_mask"], seg_key=None, allow_missing_keys=True
        )
        self._load_images = (
            LoadSubjectd(keys=self.image_keys, seg_key=None, allow_missing_keys=True) if self.image_keys else None
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        row = dict(data)
        subject = str(row.get("subject", "?"))
        if row.get("mask"):
            lm = self._load_mask(row)["mask"]
            source = row["mask"]
        elif row.get("seg"):
            d = self._load_regions(self._load_seg(row))
            source = row["seg"]
            for name, key in self.region_keys.items():
                if isinstance(d.get(key), torch.Tensor):
                    continue
                present = [
                    k
                    for k in self.image_keys
                    if row.get(k) or (row.get("image4d") and k in row.get("image4d_channels", []))
                ]
                if self._load_images is None or not present:
                    raise MaskError(
                        f"{source}: subject {subject} has no {key} and no images to derive the {name} region from"
                    )
                d = RegionFromImagesd(present, output_keys=key)(self._load_images(d))
            lm = self.conditioning.label_map(d["seg"], {name: d[key] for name, key in self.region_keys.items()})
        else:
            raise MaskError(f"subject {subject}: row has neither 'mask' nor 'seg'")
        if isinstance(lm, MetaTensor):
            lm = lm.round().to(torch.int16) if torch.is_floating_point(lm) and torch.equal(lm, lm.round()) else lm
        # the convention the input came in (recorded in each output's provenance): a condition mask is already in
        # the model's classes; a segmentation in its dataset's convention
        convention = "condition_mask" if row.get("mask") else str(row.get("label_convention") or "unknown")
        return {"subject": subject, "mask": lm, "source": str(source), "label_convention": convention}


def output_paths(
    output_dir: str | Path, subject: str, modalities: Sequence[str], layout: str = "brats2023"
) -> dict[str, Path]:
    """Files written for one subject, named in ``layout`` (BraTS 2021 ``_t1``..., 2023 ``-t1n``...) so the folder
    reads as a dataset of that naming."""
    from brainsynth.conventions import LAYOUT_SEPARATORS, layout_file_name

    folder = Path(output_dir) / subject
    paths = {m: folder / layout_file_name(subject, m, layout) for m in [*modalities, "seg", "brain_mask", "condition"]}
    paths["preview"] = folder / f"{subject}{LAYOUT_SEPARATORS[layout]}preview.png"
    return paths


def check_inputs(
    rows: Sequence[dict],
    conditioning: SemanticMaskConditioning,
    spatial_size: Sequence[int],
    region_keys: Mapping[str, str] | None = None,
    image_keys: Sequence[str] = (),
    output_dir: str | None = None,
    modalities: Sequence[str] = (),
    overwrite: bool = False,
    output_layout: str | None = None,
    allow_empty: bool = False,
) -> list[dict]:
    """Load and validate every condition mask, and check no output would be replaced, before any sampling.

    Raises ``MaskError`` listing every mask problem (one line each, naming the file), then ``OutputExistsError``
    listing the outputs that exist already. Returns ``rows``. ``allow_empty``: no rows is not an error (a rank of
    sharded generation whose items are all done).
    """
    from brainsynth.engine.io import OutputExistsError

    rows = list(rows)
    if not rows and allow_empty:
        return rows
    if not rows:
        raise MaskError("no condition masks to generate from")
    load = LoadConditionMaskd(conditioning, region_keys, image_keys)
    problems: list[str] = []
    clashes: list[str] = []
    seen: dict[str, str] = {}
    for row in rows:
        subject = str(row.get("subject"))
        where = row.get("mask") or row.get("seg") or subject
        if subject in seen:
            problems.append(f"{where}: subject id {subject!r} repeats ({seen[subject]}); outputs would collide")
        seen[subject] = str(where)
        try:
            item = load(row)
            conditioning.validate(item["mask"], source=str(where), spatial_size=spatial_size, channel_first=True)
            check_mask_spacing(item["mask"], source=str(where))
        except (MaskError, DatasetError) as e:
            problems.append(str(e))
            continue
        if output_dir is not None and not overwrite:
            paths = output_paths(output_dir, subject, modalities, output_layout_of(row, output_layout))
            clashes += [str(p) for p in paths.values() if p.exists()][:1]
    if problems:
        raise MaskError("condition mask problems (nothing was generated):\n  " + "\n  ".join(problems))
    if clashes:
        raise OutputExistsError(
            f"{len(clashes)} subject(s) already have outputs (nothing was generated), e.g. {clashes[0]}; "
            "set overwrite=true to replace them or choose another output_dir"
        )
    return rows

"""LoadSubjectd: the one loading transform every bundle starts its pipeline with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, LoadImaged, MapTransform

from brainsynth.conventions import label_convention
from brainsynth.data.dicom import read_dicom_series
from brainsynth.data.errors import DatasetError
from brainsynth.data.items import available_modalities, image_source
from brainsynth.data.reader import GuardedNibabelReader, open_nifti


def remap_labels(labels: np.ndarray | torch.Tensor, convention: str, source: str = "segmentation") -> np.ndarray:
    """Map a label map from ``convention`` to canonical label values; values outside it are an error naming
    ``source`` (the file) and the values."""
    conv = label_convention(convention)
    values = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        raise DatasetError(f"{source}: label map has non-integer, NaN or Inf values")
    values = values.astype(np.int64)
    lo, hi = int(values.min()), int(values.max())
    top = max(hi, max(conv.to_canonical)) + 1
    if lo < 0:
        raise DatasetError(f"{source}: negative label values; valid in {conv.name}: {sorted(conv.valid_values)}")
    lut = np.full(top, -1, dtype=np.int64)
    for src, dst in conv.to_canonical.items():
        lut[src] = dst
    out = lut[values]
    if (out < 0).any():
        bad = sorted(set(np.unique(values[out < 0]).tolist()))
        raise DatasetError(f"{source}: label values {bad} are outside the {conv.name} convention ({conv.description})")
    return out


def load_volume(path: str | Path, dtype: Any = np.float32) -> MetaTensor:
    """A NIfTI file or a folder of DICOM slices as a channel-first MetaTensor ``(C, X, Y, Z)`` with its RAS
    affine (the form MONAI's LoadImage + EnsureChannelFirst gives); a bad file is a DatasetError naming it."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: file not found")
    if p.is_dir():
        array, affine = read_dicom_series(p)
        meta = {
            "filename_or_obj": str(p),
            "original_affine": affine,
            "spatial_shape": np.asarray(array.shape),
            "space": "RAS",
            "original_channel_dim": "no_channel",
        }
        return MetaTensor(
            torch.as_tensor(array.astype(dtype))[None], affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta
        )
    open_nifti(p)  # the guarded reader: a bad file is one line naming it and the problem
    reader = GuardedNibabelReader()  # ... also when only its voxels are damaged
    try:
        return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=dtype)(str(p))
    except DatasetError:
        raise
    except Exception as e:  # a file nibabel reads but MONAI cannot turn into a MetaTensor
        raise DatasetError(f"{p}: cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())})") from e


class GuardedLoadImaged(LoadImaged):
    """MONAI's ``LoadImaged`` through the guarded reader (``brainsynth.data.reader``), for pipelines that load a
    plain path, e.g. MONAI Label's ``image``: a file that is not a NIfTI, empty or truncated fails with one line
    naming it and the problem, not MONAI's "cannot find a suitable reader". Arguments are ``LoadImaged``'s."""

    def __init__(self, keys: KeysCollection, *args: Any, **kwargs: Any):
        kwargs.setdefault("reader", GuardedNibabelReader())
        super().__init__(keys, *args, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        for key in self.key_iterator(dict(data)):
            if isinstance(data[key], (str, os.PathLike)):
                open_nifti(data[key])
        return super().__call__(data, reader)


class LoadSubjectd(MapTransform):
    """Load a canonical row's images as channel-first float32 MetaTensors ``(1, X, Y, Z)`` with affine and meta.

    Each key is read from a NIfTI file (MONAI LoadImage), a folder of DICOM slices (``read_dicom_series``), or
    its channel of an MSD ``image4d`` file (each 4-D file is read once per call). The segmentation
    (``seg_key``, loaded whenever the row has one; ``seg_key=None`` skips it) is remapped from the row's
    ``label_convention`` to canonical labels. Per-scan rows from ``expand_scans`` load with ``keys="image"``;
    their ``image_channel`` is consumed here so batches collate. DICOM attributes never enter the meta.
    """

    def __init__(
        self,
        keys: KeysCollection,
        seg_key: str | None = "seg",
        allow_missing_keys: bool = False,
        dtype: Any = np.float32,
    ):
        super().__init__(keys, allow_missing_keys)
        self.seg_key = seg_key
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        cache: dict[str, MetaTensor] = {}
        keys = list(self.keys)
        if self.seg_key and self.seg_key not in keys and image_source(d, self.seg_key) is not None:
            keys.append(self.seg_key)
        for key in keys:
            if key in d and not isinstance(d[key], (str, os.PathLike)):
                continue  # loaded already (e.g. by an earlier LoadSubjectd in the same pipeline)
            source = image_source(d, key)
            if source is None:
                if self.allow_missing_keys:
                    continue
                raise DatasetError(
                    f"subject {d.get('subject', '?')}: no {key} image in this row (has "
                    f"{', '.join(available_modalities(d)) or 'none'})"
                )
            path, channel = source
            if path not in cache:
                cache[path] = load_volume(path, self.dtype)
            img = cache[path]
            if channel is not None:
                if img.shape[0] <= channel:
                    raise DatasetError(f"{path}: has {img.shape[0]} channels, channel {channel} ({key}) requested")
                img = img[channel : channel + 1]
            elif img.shape[0] != 1:
                raise DatasetError(f"{path}: is 4-D ({img.shape[0]} channels) where a 3-D volume is expected")
            if key == self.seg_key:
                canonical = remap_labels(img, d.get("label_convention") or "canonical", path)
                img = MetaTensor(torch.as_tensor(canonical, dtype=img.dtype), meta=img.meta)
            d[key] = img
            d.pop(f"{key}_channel", None)
        return d


class InvertWithBackgroundd(MapTransform):
    """MONAI's ``Invertd`` whose padding holds each key's background value instead of 0.

    Undoing a centre crop pads with 0, which for a generated image in [-1, 1] is mid-grey: a volume larger than the
    model's grid would come back with a grey frame. The keys are shifted so their background is 0, inverted, and
    shifted back, so every voxel outside the generated region is exactly ``background``. ``background`` is one value
    per key (None: pad with 0, e.g. a label map); the other arguments are ``Invertd``'s.
    """

    def __init__(
        self, keys: KeysCollection, background: float | None | list[float | None] = -1.0, **invertd_kwargs: Any
    ) -> None:
        from monai.transforms import Invertd

        super().__init__(keys)
        self.background = list(background) if isinstance(background, (list, tuple)) else [background] * len(self.keys)
        if len(self.background) != len(self.keys):
            raise ValueError(
                f"InvertWithBackgroundd: {len(self.keys)} keys but {len(self.background)} background values"
            )
        self.invert = Invertd(keys, **invertd_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key, value in zip(self.keys, self.background):
            if value is not None and key in d:
                d[key] = d[key] - value
        d = self.invert(d)
        for key, value in zip(self.keys, self.background):
            if value is not None and key in d:
                d[key] = d[key] + value
        return d

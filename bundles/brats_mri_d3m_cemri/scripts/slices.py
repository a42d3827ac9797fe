"""2-D slice-wise synthesis on 3-D volumes: training slices, whole-volume inference, output writing, evaluation.

D3M (FACTS.md section 2) is a 2-D model on axial slices. The volume-level part of every pipeline is plain MONAI
(LoadSubjectd -> ConcatItemsd -> Orientationd RAS, so axial is the last axis -> per-volume 0.5-99.5 percentile
scaling to [-1, 1]); this module adds what MONAI lacks:

``LabelMaskd``            a binary mask of chosen canonical labels (enhancing tumour by default), in {-1, 1} or {0, 1}
``SelectSlicesd``         keep the eligible axial slices (tumour-bearing, brain, or all) and remember their indices
``RandSliceSamplesd``     draw 2-D training slices uniformly from the kept ones
``inplane_transform``     the in-plane 'pad' (centre pad / crop) or 'resize' step to the network size, shared by
                          training and inference so both see the same geometry
``SliceSynthesisInferer`` synthesise every (or every eligible) slice of a volume in batches, K samples each, and
                          reassemble the volume in the input grid: mean image, mask fraction, voxel-wise sd
``SaveSynthesisd``        write those volumes atomically in the input's geometry (never over existing files)
``PairedSliceMetrics``    ignite handler: per-slice / per-volume PSNR and SSIM of a run, written as CSV
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform, Randomizable, Resize, Resized, ResizeWithPadOrCrop, ResizeWithPadOrCropd

from brainsynth.conventions import LABEL_VALUES, LABELS

logger = logging.getLogger("scripts.slices")

SELECTIONS = ("tumour", "brain", "all")
INPLANE_MODES = ("pad", "resize")
#: channels of SliceSynthesisInferer's output
OUTPUT_CHANNELS = ("image", "mask_fraction", "image_sd")
#: after percentile scaling to [-1, 1], a voxel counts as brain when above this value (background is -1)
BRAIN_THRESHOLD = -0.96
#: ...and a slice counts as a brain slice when at least this fraction of its voxels is brain
BRAIN_FRACTION = 0.005


def label_values(labels: int | str | Sequence[int | str]) -> list[int]:
    """Canonical label values from names ("enhancing", "edema", ...) or values; unknown names are an error."""
    if isinstance(labels, (int, str)):
        labels = [labels]
    values = []
    for label in labels:
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in LABEL_VALUES:
                raise ValueError(f"unknown label {label!r}; canonical labels: {', '.join(LABEL_VALUES)}")
            values.append(LABEL_VALUES[label])
        else:
            value = int(label)
            if value not in LABELS:
                raise ValueError(f"unknown label value {value}; canonical values: {sorted(LABELS)}")
            values.append(value)
    return values


def subjects_with_label(
    rows: Sequence[dict], labels: int | str | Sequence[int | str], seg_key: str = "seg"
) -> list[dict]:
    """Rows whose segmentation contains any of ``labels`` (canonical; the row's label convention is applied).

    D3M trains on tumour-bearing slices of the mask label: a subject without any (e.g. no enhancing tumour)
    contributes nothing and is left out, with a log line naming how many were.
    """
    from brainsynth.data import load_volume, remap_labels

    wanted = label_values(labels)
    kept = []
    for row in rows:
        if not row.get(seg_key):
            raise ValueError(f"subject {row.get('subject')}: no segmentation ({seg_key}) to select tumour slices")
        seg = remap_labels(load_volume(row[seg_key]), row.get("label_convention") or "canonical", row[seg_key])
        if np.isin(seg, wanted).any():
            kept.append(row)
    if len(kept) < len(rows):
        logger.info(
            "%d of %d subjects have no %s voxels and are left out",
            len(rows) - len(kept),
            len(rows),
            "/".join(LABELS[v] for v in wanted),
        )
    if not kept:
        raise ValueError(f"none of the {len(rows)} subjects has {'/'.join(LABELS[v] for v in wanted)} voxels")
    return kept


class LabelMaskd(MapTransform):
    """``output_key`` = 1 where ``keys`` (a canonical label map) is one of ``labels``, else ``background``.

    D3M's target mask uses (background, foreground) = (-1, 1), the diffusion data range; evaluation regions use
    (0, 1).
    """

    def __init__(
        self,
        keys: KeysCollection,
        labels: int | str | Sequence[int | str],
        output_key: str = "mask",
        values: Sequence[float] = (-1.0, 1.0),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.labels = label_values(labels)
        self.output_key = output_key
        self.values = tuple(float(v) for v in values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            seg = d[key]
            inside = torch.isin(torch.as_tensor(seg).round().long(), torch.tensor(self.labels))
            mask = torch.where(inside, self.values[1], self.values[0]).float()
            d[self.output_key] = MetaTensor(mask, meta=seg.meta) if isinstance(seg, MetaTensor) else mask
        return d


def brain_slices(
    image: torch.Tensor, threshold: float = BRAIN_THRESHOLD, min_fraction: float = BRAIN_FRACTION
) -> torch.Tensor:
    """Boolean (D,) over the last axis of a (C, H, W, D) [-1, 1]-scaled volume: slices showing brain in channel 0."""
    fraction = (torch.as_tensor(image)[0] > threshold).float().mean(dim=(0, 1))
    return fraction >= min_fraction


class SelectSlicesd(MapTransform):
    """Keep only eligible axial slices (last axis) of ``keys``; store their indices in ``indices_key``.

    selection: "tumour" - slices where ``mask_key`` is foreground (> 0); "brain" - slices showing brain in channel
    0 of ``reference_key``; "all" - every slice. Deterministic, so MONAI's CacheDataset caches the result.
    """

    def __init__(
        self,
        keys: KeysCollection,
        selection: str = "tumour",
        mask_key: str = "mask",
        reference_key: str = "condition",
        indices_key: str = "slice_indices",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection, self.mask_key, self.reference_key = selection, mask_key, reference_key
        self.indices_key = indices_key

    def eligible(self, d: Mapping[Hashable, Any]) -> torch.Tensor:
        if self.selection == "tumour":
            return (torch.as_tensor(d[self.mask_key]) > 0).flatten(0, -2).any(dim=0)
        if self.selection == "brain":
            return brain_slices(d[self.reference_key])
        return torch.ones(d[self.reference_key].shape[-1], dtype=torch.bool)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        indices = self.eligible(d).nonzero().flatten()
        if indices.numel() == 0:
            raise ValueError(f"subject {d.get('subject', '?')}: no {self.selection} slices")
        for key in self.key_iterator(d):
            d[key] = d[key][..., indices]
        d[self.indices_key] = indices.tolist()
        return d


class RandSliceSamplesd(Randomizable, MapTransform):
    """Draw ``num_samples`` 2-D slices (uniformly over the last axis) of ``keys``; returns a list of dicts.

    Each sample holds (C, H, W) float32 tensors for ``keys``, the subject, and ``slice`` (the index in the volume
    when ``indices_key`` is present). Other entries are dropped so batches collate.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_samples: int = 1,
        indices_key: str = "slice_indices",
        keep_keys: Sequence[str] = ("subject",),
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.indices_key, self.keep_keys = int(num_samples), indices_key, tuple(keep_keys)
        self._picks: np.ndarray = np.zeros(0, dtype=int)

    def randomize(self, depth: int) -> None:
        self._picks = self.R.randint(0, depth, size=self.num_samples)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        depth = d[keys[0]].shape[-1]
        self.randomize(depth)
        indices = d.get(self.indices_key) or list(range(depth))
        samples = []
        for pick in self._picks.tolist():
            sample: dict[Hashable, Any] = {k: torch.as_tensor(d[k][..., pick]).float() for k in keys}
            sample.update({k: d[k] for k in self.keep_keys if k in d})
            sample["slice"] = int(indices[pick])
            samples.append(sample)
        return samples


def inplane_transform(
    spatial_size: Sequence[int],
    mode: str = "pad",
    keys: KeysCollection | None = None,
    pad_value: float = -1.0,
    interp: str | Sequence[str] = "bilinear",
):
    """The in-plane step from the input grid to the network's (H, W), depth untouched.

    "pad": centre padding with ``pad_value`` (background) or centre cropping (MONAI ResizeWithPadOrCrop) -
    exactly reversible where the input fits; "resize": interpolation (MONAI Resize), as the authors' 240 -> 256.
    With ``keys`` the dictionary version (``interp`` may be per key, e.g. "nearest" for label maps).
    """
    if mode not in INPLANE_MODES:
        raise ValueError(f"in-plane mode must be one of {INPLANE_MODES}, got {mode!r}")
    size = [int(s) for s in spatial_size][:2] + [-1]
    if mode == "pad":
        if keys is None:
            return ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=pad_value)
        return ResizeWithPadOrCropd(keys=keys, spatial_size=size, mode="constant", value=pad_value)
    if keys is None:
        return Resize(spatial_size=size, mode=interp if isinstance(interp, str) else interp[0])
    return Resized(keys=keys, spatial_size=size, mode=interp)


def _resize_back(stack: torch.Tensor, shape: Sequence[int], mode: str, pad_value: float) -> torch.Tensor:
    """Inverse of ``inplane_transform`` for a (C, S, S, n) stack back to (C, H, W, n)."""
    back = inplane_transform(shape[:2], mode, pad_value=pad_value)
    out = back(stack)
    return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)


class SliceSynthesisInferer(Inferer):
    """Synthesise a whole volume slice by slice with a conditional 2-D diffusion inferer (e.g. MSSDMInferer).

    ``inputs``: (B, C_cond, H, W, D) condition volumes ([-1, 1], axial = last axis). For every slice (or only
    slices showing brain with ``skip_empty_slices``; others get ``background``) the slices are brought to the
    network size (``inplane_mode``), sampled ``num_samples`` times in batches of ``slice_batch_size`` and brought
    back. Returns (B, 3, H, W, D) in the input's grid (a MetaTensor with its meta when the input has one):
    channel 0 the mean synthetic image over samples, 1 the fraction of samples whose mask channel is foreground
    (0 without a mask channel), 2 the voxel-wise standard deviation of the image over samples (0 for one sample).

    With ``mask_background`` voxels where every condition channel is background (outside the head) are set to
    background in the output, as in the input. The initial noise of slice z, sample k of a volume is drawn from a
    generator seeded ``item_seed(volume seed, "k/z")``, the volume seed being ``item_seeds[i]`` (the evaluator's
    ``ItemSeedsPrepareBatch``: ``item_seed(seed, subject)``; ``item_seed(seed, str(i))`` for item ``i`` of a call
    without them, e.g. MONAI Label's), so a subject's synthesis depends on the seed and its id alone: not on the
    slice batch size, the other slices or subjects, the number of ranks or a resume
    (``brainsynth.engine.seeding``). Each slice is sampled alone; ``slice_batch_size`` slices share the trip into
    the network's grid and back and one progress step.
    """

    def __init__(
        self,
        diffusion_inferer,
        target_channels: int = 2,
        mask_channel: int | None = 1,
        spatial_size: Sequence[int] = (256, 256),
        inplane_mode: str = "pad",
        slice_batch_size: int = 16,
        num_samples: int = 1,
        num_inference_steps: int | None = None,
        seed: int = 0,
        skip_empty_slices: bool = True,
        mask_background: bool = True,
        background: float = -1.0,
        progress: bool = True,
    ):
        super().__init__()
        if inplane_mode not in INPLANE_MODES:
            raise ValueError(f"inplane_mode must be one of {INPLANE_MODES}, got {inplane_mode!r}")
        if num_samples < 1 or slice_batch_size < 1:
            raise ValueError("num_samples and slice_batch_size must be >= 1")
        self.diffusion_inferer = diffusion_inferer
        self.target_channels, self.mask_channel = int(target_channels), mask_channel
        self.spatial_size = [int(s) for s in spatial_size][:2]
        self.inplane_mode = inplane_mode
        self.slice_batch_size, self.num_samples = int(slice_batch_size), int(num_samples)
        self.num_inference_steps = num_inference_steps
        self.seed, self.skip_empty_slices, self.background = int(seed), bool(skip_empty_slices), float(background)
        self.mask_background = bool(mask_background)
        self.progress = progress

    def _noise(self, slices: Sequence[int], sample: int, volume_seed: int, device) -> torch.Tensor:
        from brainsynth.engine.seeding import item_noise, item_seed

        seeds = [item_seed(volume_seed, f"{sample}/{int(z)}") for z in slices]
        return item_noise((self.target_channels, *self.spatial_size), seeds, device)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, item_seeds=None, **kwargs: Any) -> torch.Tensor:
        """(B, 3, H, W, D) syntheses of the (B, C_cond, H, W, D) ``inputs``; ``item_seeds``: one int per volume."""
        from brainsynth.engine.seeding import seeds_of_batch

        if inputs.ndim != 5:
            raise ValueError(f"SliceSynthesisInferer expects (B, C, H, W, D) volumes, got shape {tuple(inputs.shape)}")
        item_seeds = seeds_of_batch(item_seeds, inputs.shape[0], self.seed)
        was_training = network.training
        network.eval()
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        volumes = [self._one_volume(v, network, s) for v, s in zip(plain, item_seeds)]
        network.train(was_training)
        out = torch.stack(volumes)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return out

    def _one_volume(self, cond: torch.Tensor, network: torch.nn.Module, volume_seed: int) -> torch.Tensor:
        _, h, w, depth = cond.shape
        device = cond.device
        todo = brain_slices(cond).nonzero().flatten().tolist() if self.skip_empty_slices else list(range(depth))
        result = torch.zeros(len(OUTPUT_CHANNELS), h, w, depth, device=device)
        result[0] = self.background
        if not todo:
            return result
        to_net = inplane_transform(self.spatial_size, self.inplane_mode, pad_value=self.background)
        batches = [todo[i : i + self.slice_batch_size] for i in range(0, len(todo), self.slice_batch_size)]
        progress = None
        if self.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(batches) * self.num_samples, desc="slice batches", leave=False)
        for zs in batches:
            stack = to_net(cond[..., zs])  # (C, S, S, n)
            stack = stack.as_tensor() if isinstance(stack, MetaTensor) else torch.as_tensor(stack)
            stack = stack.permute(3, 0, 1, 2).contiguous().float()  # (n, C, S, S)
            images, masks = [], []
            steps = {"num_inference_steps": self.num_inference_steps} if self.num_inference_steps else {}
            for k in range(self.num_samples):
                noise = self._noise(zs, k, volume_seed, device)
                # each slice sampled alone: batched convolutions round a slice differently beside others
                # (brainsynth.engine.seeding), so a slice would depend on the batch size
                sample = torch.cat(
                    [
                        self.diffusion_inferer.sample(
                            noise[j : j + 1], network, conditioning=stack[j : j + 1], verbose=False, **steps
                        )
                        for j in range(len(zs))
                    ]
                )
                back = _resize_back(sample.permute(1, 2, 3, 0), (h, w), self.inplane_mode, self.background)
                images.append(back[0])
                if self.mask_channel is not None and self.mask_channel < back.shape[0]:
                    masks.append((back[self.mask_channel] > 0).float())
                if progress is not None:
                    progress.update(1)
            images_t = torch.stack(images)
            result[0][..., zs] = images_t.mean(0)
            if masks:
                result[1][..., zs] = torch.stack(masks).mean(0)
            if self.num_samples > 1:
                result[2][..., zs] = images_t.std(0)
        if progress is not None:
            progress.close()
        if self.mask_background:  # outside the head (every condition at background) the output is background too
            outside = (cond <= BRAIN_THRESHOLD).all(dim=0)
            result[0][outside] = self.background
            result[1:, outside] = 0.0
        return result


def _input_path(value: Any) -> str | None:
    """The file or DICOM folder an input was read from (a path, or a loaded MetaTensor's source), else None."""
    if isinstance(value, MetaTensor):
        value = value.meta.get("filename_or_obj")
    return str(value) if isinstance(value, (str, os.PathLike)) and value else None


def _reference_file(row: Mapping[str, Any], key: str) -> str | None:
    """The NIfTI file the input ``key`` came from (a path, or a loaded MetaTensor's filename), else None."""
    source = _input_path(row.get(key))
    return source if source and source.endswith((".nii", ".nii.gz")) else None


class SaveSynthesisd(MapTransform):
    """Write a subject's synthesis (``keys``, (3, H, W, D) in the input's grid) as NIfTI files, atomically.

    Files in ``output_dir/<subject>/``, named in the input's BraTS naming (``output_layout`` None: as the input's
    file names; ``"brats2021"`` / ``"brats2023"`` to choose): the synthetic target (channel 0, in [0, 1]: the
    [-1, 1] network range mapped linearly) as ``<subject>_t1ce.nii.gz`` (BraTS 2021) or ``<subject>-t1c.nii.gz``
    (BraTS 2023), the predicted mask (channel 1 >= ``mask_threshold``, uint8) as ``<subject><sep><mask_name>``
    and, when ``save_uncertainty``, the target's name with ``_sd`` (channel 2 on the same [0, 1] scale). The
    folder reads as a dataset with the target modality filled in; every file is marked synthetic. Geometry is
    the ``reference_key`` input's (its header for NIfTI; the affine for DICOM input). An existing file is an
    error unless ``overwrite``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        reference_key: str = "t1w",
        target_modality: str = "t1ce",
        mask_name: str = "enhancing_predicted",
        save_mask: bool = True,
        save_uncertainty: bool = False,
        mask_threshold: float = 0.5,
        overwrite: bool = False,
        allow_missing_keys: bool = False,
        condition_keys: Sequence[str] = ("t1w", "t2w", "flair"),
        provenance: Mapping[str, Any] | None = None,
        output_layout: str | None = None,
    ):
        """``provenance``: the run's settings for the synthetic mark (``brainsynth.data.provenance.RunProvenance``);
        every written volume is marked, with the hashes of the ``condition_keys`` inputs as its conditions."""
        from brainsynth.data.provenance import RunProvenance

        super().__init__(keys, allow_missing_keys)
        self.condition_keys = list(condition_keys)
        self.provenance = RunProvenance(Path(__file__).resolve().parents[1], **dict(provenance or {}))
        self.output_dir = Path(output_dir)
        self.reference_key = reference_key
        self.target_modality, self.mask_name = target_modality, mask_name
        self.save_mask, self.save_uncertainty = bool(save_mask), bool(save_uncertainty)
        self.mask_threshold, self.overwrite = float(mask_threshold), bool(overwrite)
        self.output_layout = output_layout

    def layout(self, row: Mapping[str, Any]) -> str:
        """The naming the outputs of ``row`` take: the chosen one, else the input's (the one rule of every bundle,
        ``brainsynth.data.output_layout_of``)."""
        from brainsynth.data import output_layout_of

        return output_layout_of(row, self.output_layout)

    def paths(self, subject: str, layout: str = "brats2023") -> dict[str, Path]:
        from brainsynth.conventions import layout_file_name

        folder = self.output_dir / subject
        image = folder / layout_file_name(subject, self.target_modality, layout)
        out = {"image": image}
        if self.save_mask:
            out["mask"] = folder / layout_file_name(subject, self.mask_name, layout)
        if self.save_uncertainty:
            out["sd"] = image.with_name(image.name[: -len(".nii.gz")] + "_sd.nii.gz")
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from brainsynth.data.provenance import input_hashes
        from brainsynth.engine.io import OutputExistsError, save_nifti

        d = dict(data)
        subject = str(d.get("subject") or "subject")
        conditions = {
            "input_modalities": self.condition_keys,
            **input_hashes({k: _input_path(d.get(k)) for k in self.condition_keys}),
        }
        paths = self.paths(subject, self.layout(d))
        if not self.overwrite:
            existing = [str(p) for p in paths.values() if p.exists()]
            if existing:
                raise OutputExistsError(f"{', '.join(existing)}: already exist; set overwrite to replace them")
        for key in self.key_iterator(d):
            volume = d[key]
            affine = volume.affine.numpy() if isinstance(volume, MetaTensor) else None
            array = torch.as_tensor(volume).detach().cpu().float().numpy()
            if array.ndim != 4 or array.shape[0] != len(OUTPUT_CHANNELS):
                raise ValueError(f"{key}: expected a ({len(OUTPUT_CHANNELS)}, H, W, D) synthesis, got {array.shape}")
            if not np.isfinite(array).all():
                raise FloatingPointError(
                    f"{subject}: the synthesis is not finite (NaN / Inf); nothing was written. "
                    f"Likely damaged weights ({self.provenance.weights}) or an unstable setting"
                )
            reference = _reference_file(d, self.reference_key)
            geometry = {"reference": reference} if reference else {"affine": affine}

            def mark(output):
                return self.provenance.record(conditions, output=output)

            save_nifti(
                (array[0] + 1) / 2, paths["image"], overwrite=self.overwrite, provenance=mark("image"), **geometry
            )
            if self.save_mask:
                save_nifti(
                    array[1] >= self.mask_threshold,
                    paths["mask"],
                    overwrite=self.overwrite,
                    dtype=np.uint8,
                    provenance=mark("predicted mask"),
                    **geometry,
                )
            if self.save_uncertainty:
                save_nifti(
                    array[2] / 2, paths["sd"], overwrite=self.overwrite, provenance=mark("uncertainty"), **geometry
                )
            d[f"{key}_files"] = {k: str(v) for k, v in paths.items()}
        return d


class PairedSliceMetrics:
    """Ignite handler for a SupervisedEvaluator whose prediction is a SliceSynthesisInferer output.

    Per iteration (one subject, batch size 1): PSNR / SSIM of the synthetic image (pred channel 0) against the
    real one (``label``), over the whole slice and inside ``region_key`` (a {0, 1} map), for every evaluated slice;
    both images go from [-1, 1] to [0, 1] first (data range 1). At the end: ``<output_dir>/<method>_per_slice.csv``
    and ``<method>_per_volume.csv``, and with ``example_subjects`` > 0 the first subjects' synthetic, real and region
    slices in ``<method>_examples.npz`` (for figures).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        method: str,
        region_key: str = "region",
        indices_key: str = "slice_indices",
        overwrite: bool = False,
        example_subjects: int = 1,
    ):
        self.output_dir, self.method = Path(output_dir), str(method)
        self.region_key, self.indices_key, self.overwrite = region_key, indices_key, bool(overwrite)
        self.example_subjects = int(example_subjects)
        self.slice_rows: list[dict] = []
        self.volume_rows: list[dict] = []
        self.examples: dict[str, np.ndarray] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self.slice_rows, self.volume_rows, self.examples = [], [], {}

    @staticmethod
    def _first(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    def _iteration(self, engine) -> None:
        from brainsynth.metrics.paired import slice_metrics, slice_rows, volume_metrics

        batch, output = engine.state.batch, engine.state.output
        pred = torch.as_tensor(output["pred"]).detach().cpu().float()
        label = torch.as_tensor(output["label"]).detach().cpu().float()
        region = torch.as_tensor(batch[self.region_key]).detach().cpu() > 0.5
        subjects = batch.get("subject", [f"subject{engine.state.iteration}"] * pred.shape[0])
        indices = batch.get(self.indices_key)
        for b in range(pred.shape[0]):
            # (H, W, n) -> (n, H, W) slices, [-1, 1] -> [0, 1]
            p = ((pred[b, 0] + 1) / 2).clamp(0, 1).permute(2, 0, 1)
            t = ((label[b, 0] + 1) / 2).clamp(0, 1).permute(2, 0, 1)
            r = region[b, 0].permute(2, 0, 1)
            zs = (
                [int(torch.as_tensor(i).reshape(-1)[b]) for i in indices]
                if indices is not None
                else list(range(p.shape[0]))
            )
            subject = str(subjects[b])
            m = slice_metrics(p, t, r)
            self.slice_rows += slice_rows(m, subject, zs, self.method)
            self.volume_rows.append({"method": self.method, "subject": subject, "slices": len(zs), **volume_metrics(m)})
            if len(self.volume_rows) <= self.example_subjects:
                for name, a in (("synthetic", p), ("real", t), ("region", r.float())):
                    self.examples[f"{subject}/{name}"] = a.numpy().astype(np.float32)
                self.examples[f"{subject}/slices"] = np.asarray(zs)

    def _write(self, engine) -> None:
        from brainsynth.engine.training import is_main_process
        from brainsynth.metrics.paired import write_csv

        if not is_main_process():
            return
        write_csv(self.slice_rows, self.output_dir / f"{self.method}_per_slice.csv", overwrite=self.overwrite)
        write_csv(self.volume_rows, self.output_dir / f"{self.method}_per_volume.csv", overwrite=self.overwrite)
        if self.examples:
            from brainsynth.engine.io import atomic_path

            with atomic_path(self.output_dir / f"{self.method}_examples.npz", overwrite=self.overwrite) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **self.examples)
        finite = [r["psnr_region"] for r in self.slice_rows if math.isfinite(r["psnr_region"])]
        logger.info(
            "%s: %d slices of %d subjects evaluated; mean tumour PSNR %.2f dB",
            self.method,
            len(self.slice_rows),
            len(self.volume_rows),
            float(np.mean(finite)) if finite else float("nan"),
        )

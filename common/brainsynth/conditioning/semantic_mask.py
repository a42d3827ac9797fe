"""Semantic mask conditioning (Med-DDPM): a label map becomes one-hot channels concatenated to the noisy image.

One object, :class:`SemanticMaskConditioning`, owns the whole convention so training, sampling, evaluation and mask
augmentation can never disagree on it:

* the ordered **class list** - each class is a canonical tumour label name (``necrotic_core``, ``edema``,
  ``enhancing``, ``lesion``), ``tumour`` (the union of the three tumour labels), or a region given by a binary
  mask (``brain``, ``head``). Channel ``i`` of the condition is class ``i``;
* the **condition label map** - one integer volume, 0 = none of the classes, ``i + 1`` = class ``i``. With the
  classes ``[necrotic_core, edema, enhancing, brain]`` it is exactly the authors' BraTS mask (1 NCR, 2 ED,
  3 ET, 4 brain); with ``[head, tumour]`` their whole-head mask (1 head, 2 tumour). Tumour classes are painted
  over mask regions, so the classes are mutually exclusive, as in the authors' masks;
* the **value range** of the one-hot channels: ``(0, 1)`` (authors' BraTS variant) or ``(-1, 1)`` (whole-head).

The channels are concatenated after the noisy image at every denoising step by MONAI's own
``DiffusionInferer(mode="concat")``, for training (:class:`MaskConditionedPrepareBatch`) and for sampling
(:class:`MaskConditionedSampler`, ancestral DDPM or ``brainsynth.schedulers.ddim.ExactDDIMScheduler``).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDPMScheduler, Scheduler
from monai.transforms import MapTransform, ResizeWithPadOrCrop

from brainsynth.conventions import LABEL_VALUES
from brainsynth.engine.acceleration import Float32Output
from brainsynth.schedulers.targets import SchedulerTargetPrepareBatch

#: tumour labels summarised by the class name "tumour"
TUMOUR_LABELS: tuple[int, ...] = (LABEL_VALUES["necrotic_core"], LABEL_VALUES["edema"], LABEL_VALUES["enhancing"])
#: classes that come from a canonical segmentation value
LABEL_CLASSES: dict[str, tuple[int, ...]] = {
    "necrotic_core": (LABEL_VALUES["necrotic_core"],),
    "edema": (LABEL_VALUES["edema"],),
    "enhancing": (LABEL_VALUES["enhancing"],),
    "lesion": (LABEL_VALUES["lesion"],),
    "tumour": TUMOUR_LABELS,
}
#: classes that come from a binary mask of the subject (brain mask, head mask)
REGION_CLASSES: tuple[str, ...] = ("brain", "head")

#: the authors' two variants (FACTS.md section 1)
BRATS_CLASSES: tuple[str, ...] = ("necrotic_core", "edema", "enhancing", "brain")
WHOLE_HEAD_CLASSES: tuple[str, ...] = ("head", "tumour")


class MaskError(ValueError):
    """A condition mask that the model cannot use; the message names the file and the problem."""


def source_name(data: Any, default: str = "mask") -> str:
    """The file a (Meta)Tensor was loaded from, for error messages."""
    meta = getattr(data, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return default


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


class SemanticMaskConditioning:
    """The class list, label-map convention and one-hot value range of a mask-conditioned diffusion model.

    Args:
        classes: ordered class names; channel ``i`` of the condition is ``classes[i]``.
        value_range: (off, on) values of the one-hot channels, e.g. ``(0, 1)`` or ``(-1, 1)``.
        required: classes that must be present in every mask (default: the region classes, because a mask
            without its brain/head is out of the model's distribution and usually means a bare tumour
            segmentation was passed where a condition mask was expected).
    """

    def __init__(
        self,
        classes: Sequence[str] = BRATS_CLASSES,
        value_range: Sequence[float] = (0.0, 1.0),
        required: Sequence[str] | None = None,
    ):
        classes = tuple(str(c) for c in classes)
        unknown = [c for c in classes if c not in LABEL_CLASSES and c not in REGION_CLASSES]
        if unknown or not classes:
            raise ValueError(
                f"unknown conditioning class(es) {unknown or classes}; valid: "
                f"{', '.join(list(LABEL_CLASSES) + list(REGION_CLASSES))}"
            )
        if len(set(classes)) != len(classes):
            raise ValueError(f"conditioning classes repeat: {classes}")
        labels = [v for c in classes if c in LABEL_CLASSES for v in LABEL_CLASSES[c]]
        if len(set(labels)) != len(labels):
            raise ValueError(f"conditioning classes {classes} overlap (e.g. 'tumour' together with one of its parts)")
        if len(value_range) != 2 or float(value_range[0]) >= float(value_range[1]):
            raise ValueError(f"value_range must be (off, on) with off < on, got {value_range}")
        self.classes = classes
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.required = tuple(c for c in classes if c in REGION_CLASSES) if required is None else tuple(required)
        missing = [c for c in self.required if c not in classes]
        if missing:
            raise ValueError(f"required classes {missing} are not among the classes {classes}")

    @property
    def num_channels(self) -> int:
        return len(self.classes)

    @property
    def region_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c in REGION_CLASSES)

    @property
    def covered_labels(self) -> set[int]:
        """Canonical segmentation values that some class represents (0 is always allowed)."""
        return {0} | {v for c in self.classes if c in LABEL_CLASSES for v in LABEL_CLASSES[c]}

    def __repr__(self) -> str:
        return f"SemanticMaskConditioning(classes={list(self.classes)}, value_range={self.value_range})"

    # --- label maps -----------------------------------------------------------------------------------------
    def label_map(self, seg: Any, regions: Mapping[str, Any] | None = None, source: str | None = None) -> torch.Tensor:
        """Condition label map (values 0..n) from a canonical segmentation and binary region masks.

        ``seg`` holds canonical labels; ``regions`` maps each region class (``brain``/``head``) to a binary mask of
        the same shape. Region classes are painted first and tumour classes over them. A segmentation value that
        no class represents is an error (silently turning, say, MS lesions into brain would be wrong).
        """
        seg_t = _as_tensor(seg)
        source = source or source_name(seg, "segmentation")
        regions = dict(regions or {})
        values = torch.unique(seg_t)
        if torch.is_floating_point(values) and not torch.equal(values, values.round()):
            fractional = values[values != values.round()][:5].tolist()
            raise MaskError(f"{source}: segmentation has non-integer values {fractional}")
        stray = sorted(set(int(v) for v in values.tolist()) - self.covered_labels)
        if stray:
            raise MaskError(
                f"{source}: label(s) {stray} in the segmentation are not represented by the "
                f"conditioning classes {list(self.classes)} (canonical labels: {LABEL_VALUES})"
            )
        out = torch.zeros(seg_t.shape, dtype=torch.int64, device=seg_t.device)
        for index, name in enumerate(self.classes, start=1):
            if name in REGION_CLASSES:
                if name not in regions or regions[name] is None:
                    raise MaskError(f"{source}: class {name!r} needs a {name} mask, none was given")
                region = _as_tensor(regions[name]).to(seg_t.device)
                if tuple(region.shape) != tuple(seg_t.shape):
                    raise MaskError(
                        f"{source_name(regions[name], name + ' mask')}: shape {tuple(region.shape)} "
                        f"differs from the segmentation's {tuple(seg_t.shape)}"
                    )
                out[region > 0.5] = index
        for index, name in enumerate(self.classes, start=1):
            if name in LABEL_CLASSES:
                out[torch.isin(seg_t.long(), torch.tensor(LABEL_CLASSES[name], device=seg_t.device))] = index
        if isinstance(seg, MetaTensor):  # keep affine / filename for later inversion and saving
            out = MetaTensor(out, meta=dict(seg.meta), applied_operations=list(getattr(seg, "applied_operations", [])))
        return out

    def validate(
        self,
        label_map: Any,
        source: str | None = None,
        spatial_dims: int = 3,
        spatial_size: Sequence[int] | None = None,
        channel_first: bool | None = None,
    ) -> None:
        """Raise :class:`MaskError` naming ``source`` when ``label_map`` is not a usable condition mask.

        Checks: ``spatial_dims`` spatial axes (plus a leading channel of 1: required with ``channel_first=True``, as
        for loaded MONAI data, optional with ``None``), integer values in 0..n, the
        required classes present, and - when ``spatial_size`` is the model's grid - that centre cropping/padding to
        that grid keeps every non-zero voxel (so the output can be put back in the mask's geometry).
        """
        lm = _as_tensor(label_map)
        source = source or source_name(label_map)
        shape = tuple(lm.shape)
        spatial_shape = shape[1:] if channel_first else shape
        if lm.ndim == spatial_dims + 1 and shape[0] == 1 and channel_first is not False:
            lm = lm[0]
        elif lm.ndim != spatial_dims or channel_first:
            raise MaskError(
                f"{source}: a condition mask must be a {spatial_dims}-D label map (one label channel), "
                f"got {'spatial ' if channel_first else ''}shape {spatial_shape}"
            )
        if lm.numel() == 0:
            raise MaskError(f"{source}: empty mask")
        if torch.is_floating_point(lm):
            if not torch.isfinite(lm).all():
                raise MaskError(f"{source}: mask contains NaN or infinite values")
            fractional = lm[lm != lm.round()]
            if fractional.numel():
                raise MaskError(
                    f"{source}: mask has non-integer values such as {fractional[:3].tolist()}; a label "
                    f"map with values 0..{self.num_channels} is expected"
                )
        values = sorted(int(v) for v in torch.unique(lm).tolist())
        valid = set(range(self.num_channels + 1))
        bad = [v for v in values if v not in valid]
        if bad:
            legend = ", ".join(f"{i} {c}" for i, c in enumerate(self.classes, start=1))
            raise MaskError(
                f"{source}: label value(s) {bad} are outside this model's set {{0..{self.num_channels}}} "
                f"(0 background, {legend})"
            )
        absent = [c for c in self.required if self.classes.index(c) + 1 not in values]
        if absent:
            raise MaskError(
                f"{source}: no {', '.join(absent)} voxels; a condition mask labels the "
                f"{' and '.join(absent)} too (0 background, "
                + ", ".join(f"{i} {c}" for i, c in enumerate(self.classes, start=1))
                + "); a bare tumour segmentation needs its brain mask (datalist rows with seg and "
                "brain_mask)"
            )
        self._check_region_encloses_labels(lm, values, source)
        if spatial_size is not None:
            size = tuple(int(s) for s in spatial_size)
            if len(size) != spatial_dims:
                raise ValueError(f"spatial_size {size} must have {spatial_dims} entries")
            foreground = (lm > 0).to(torch.uint8)[None]
            kept = ResizeWithPadOrCrop(size)(foreground)
            if int(kept.sum()) != int(foreground.sum()):
                raise MaskError(
                    f"{source}: shape {tuple(lm.shape)} does not match the model's grid {size} and "
                    f"centre cropping would cut off labelled voxels; resample or crop the mask so its "
                    f"content fits {size} (at the model's voxel spacing)"
                )

    def _check_region_encloses_labels(self, lm: torch.Tensor, values: list[int], source: str) -> None:
        """A condition mask's region (brain / head) surrounds its tumour and is larger than it. A raw segmentation
        passed as a mask fails this: e.g. BraTS 2021's {0, 1, 2, 4} reads as "enhancing = brain", leaving a small
        "brain" and a tumour bordering on background."""
        regions = [self.classes.index(c) + 1 for c in self.region_classes]
        labels = [i for i, c in enumerate(self.classes, start=1) if c in LABEL_CLASSES and i in values]
        if not regions or not labels:
            return
        region = torch.isin(lm.long(), torch.tensor(regions, device=lm.device))
        labelled = torch.isin(lm.long(), torch.tensor(labels, device=lm.device))
        n_region, n_labelled = int(region.sum()), int(labelled.sum())
        # the one-voxel shell around the labelled voxels: inside a region it is region or label, not background
        shell = _dilate(labelled) & ~labelled
        open_fraction = float((shell & (lm == 0)).sum()) / max(int(shell.sum()), 1)
        if n_region <= n_labelled or open_fraction > 0.5:
            names = " / ".join(self.region_classes)
            raise MaskError(
                f"{source}: this does not look like a condition mask: the {names} region ({n_region} voxels) should "
                f"surround the tumour labels ({n_labelled} voxels), but it is "
                f"{'smaller' if n_region <= n_labelled else 'open'}"
                f" and {100 * open_fraction:.0f} % of the tumour's border is background. A raw segmentation (e.g. "
                f"BraTS 2021 labels 1, 2, 4) is not a condition mask: convert it with its brain mask, "
                f"SemanticMaskConditioning({list(self.classes)}).label_map(canonical_seg, {{'brain': brain_mask}}), "
                f"or give a datalist row with seg and brain_mask and let the bundle build the mask"
            )

    # --- one-hot --------------------------------------------------------------------------------------------
    def one_hot(self, label_map: Any, channel_dim: int = 0) -> torch.Tensor:
        """One channel per class, in class order, valued ``value_range`` (off, on).

        ``label_map`` has a singleton channel at ``channel_dim`` (``(1, *spatial)`` or ``(B, 1, *spatial)``); the
        result has ``num_channels`` there.
        """
        lm = _as_tensor(label_map)
        if lm.shape[channel_dim] != 1:
            raise ValueError(
                f"{source_name(label_map)}: expected one label channel at dim {channel_dim}, got shape "
                f"{tuple(lm.shape)}"
            )
        codes = torch.arange(1, self.num_channels + 1, device=lm.device)
        view = [1] * lm.ndim
        view[channel_dim] = self.num_channels
        hot = (lm.long() == codes.view(view)).to(torch.float32)
        off, on = self.value_range
        out = hot * (on - off) + off
        if isinstance(label_map, MetaTensor):
            out = MetaTensor(
                out, meta=dict(label_map.meta), applied_operations=list(getattr(label_map, "applied_operations", []))
            )
        return out

    def from_one_hot(self, condition: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
        """Inverse of :meth:`one_hot`: the label map (singleton channel) from one-hot channels."""
        off, on = self.value_range
        hot = condition > (off + on) / 2
        view = [-1 if d == channel_dim % condition.ndim else 1 for d in range(condition.ndim)]
        codes = torch.arange(1, self.num_channels + 1, device=condition.device).view(view)
        return (hot * codes).amax(channel_dim, keepdim=True).long()


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """Binary dilation by one voxel (3x3(x3) neighbourhood) of a 2-D or 3-D boolean mask."""
    pool = torch.nn.functional.max_pool3d if mask.ndim == 3 else torch.nn.functional.max_pool2d
    return pool(mask[None, None].float(), kernel_size=3, stride=1, padding=1)[0, 0] > 0


# --- MONAI transforms ----------------------------------------------------------------------------------------
class ConditionLabelsd(MapTransform):
    """Build the condition label map at ``output_key`` from a canonical segmentation and region masks.

    ``region_keys`` maps each region class to the data key holding its binary mask, e.g. ``{"brain": "brain_mask"}``.
    """

    def __init__(
        self,
        conditioning: SemanticMaskConditioning,
        seg_key: str = "seg",
        region_keys: Mapping[str, str] | None = None,
        output_key: str = "mask",
        allow_missing_keys: bool = False,
    ):
        super().__init__([seg_key], allow_missing_keys)
        self.conditioning = conditioning
        self.seg_key = seg_key
        self.region_keys = dict(region_keys or {})
        missing = [c for c in conditioning.region_classes if c not in self.region_keys]
        if missing:
            raise ValueError(
                f"region_keys must name the data key of the {missing} mask(s), e.g. {{'{missing[0]}': 'brain_mask'}}"
            )
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        regions = {}
        for name, key in self.region_keys.items():
            if key not in d:
                raise MaskError(f"{source_name(d.get(self.seg_key), 'item')}: no {key!r} entry for the {name} mask")
            regions[name] = d[key]
        d[self.output_key] = self.conditioning.label_map(d[self.seg_key], regions)
        return d


class RegionFromImagesd(MapTransform):
    """Fill missing region masks (e.g. ``brain_mask``) with the voxels where any image at ``keys`` is non-zero.

    BraTS releases are skull-stripped with an exactly-zero background and ship no brain mask; the authors' brain
    label is the non-zero region. A row that has its own mask file keeps it (``overwrite=False``).
    """

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection = "brain_mask", overwrite: bool = False):
        super().__init__(keys)
        self.output_keys = (output_keys,) if isinstance(output_keys, str) else tuple(output_keys)
        self.overwrite = overwrite

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        missing = [k for k in self.output_keys if self.overwrite or not isinstance(d.get(k), torch.Tensor)]
        if not missing:
            return d
        images = [_as_tensor(d[k]) for k in self.key_iterator(d)]
        if not images:
            raise MaskError(f"subject {d.get('subject', '?')}: no {', '.join(missing)} and no images to derive it from")
        region = torch.zeros(images[0].shape, dtype=torch.bool, device=images[0].device)
        for image in images:
            region |= image != 0
        out = region.to(torch.uint8)
        first = d[next(iter(self.key_iterator(d)))]
        if isinstance(first, MetaTensor):
            out = MetaTensor(out).copy_meta_from(first)
        for key in missing:
            d[key] = out
        return d


class ValidateConditionMaskd(MapTransform):
    """Raise :class:`MaskError` (naming the file) when a condition label map is unusable; see ``validate``."""

    def __init__(
        self,
        keys: KeysCollection,
        conditioning: SemanticMaskConditioning,
        spatial_size: Sequence[int] | None = None,
        spatial_dims: int = 3,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.conditioning, self.spatial_size, self.spatial_dims = conditioning, spatial_size, spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.conditioning.validate(
                d[key], spatial_dims=self.spatial_dims, spatial_size=self.spatial_size, channel_first=True
            )
            check_mask_spacing(d[key], spatial_dims=self.spatial_dims)
        return d


def check_mask_spacing(mask: Any, source: str | None = None, spatial_dims: int = 3) -> None:
    """Raise ``MaskError`` naming the file when a loaded mask's voxel size (from its affine) is implausible for a
    brain MRI (``brainsynth.data.check.PLAUSIBLE_SPACING_MM``): a unit mix-up in the header, not a real scan."""
    from brainsynth.data.check import PLAUSIBLE_SPACING_MM

    if not isinstance(mask, MetaTensor):
        return
    spacing = [round(float(v), 4) for v in mask.pixdim[:spatial_dims]]
    low, high = PLAUSIBLE_SPACING_MM
    if not all(low <= v <= high for v in spacing):
        raise MaskError(
            f"{source or source_name(mask)}: voxel spacing {spacing} mm is outside the plausible {low:g} to "
            f"{high:g} mm of a brain MRI; the header's units or affine are likely wrong"
        )


class MaskOneHotd(MapTransform):
    """Condition label map(s) at ``keys`` -> one-hot condition channels (written to ``output_keys`` or in place)."""

    def __init__(
        self,
        keys: KeysCollection,
        conditioning: SemanticMaskConditioning,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.conditioning = conditioning
        if output_keys is None:
            outs = self.keys
        else:
            outs = (output_keys,) if isinstance(output_keys, str) else tuple(output_keys)
        if len(outs) != len(self.keys):
            raise ValueError("output_keys must have one entry per key")
        self.output_keys = dict(zip(self.keys, outs))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_keys[key]] = self.conditioning.one_hot(d[key])
        return d


# --- training and sampling with MONAI's DiffusionInferer --------------------------------------------------------
class MaskConditionedPrepareBatch(SchedulerTargetPrepareBatch):
    """MONAI's DiffusionPrepareBatch that also asks DiffusionInferer to concatenate the condition (mode="concat").

    The batch's ``condition_name`` entry (one-hot mask channels) is concatenated after the noisy image on the
    channel axis by the inferer, so the SupervisedTrainer loop itself is MONAI's. The loss target follows the
    training ``scheduler``'s ``prediction_type`` (``brainsynth.schedulers.targets``): the noise (``epsilon``, the
    authors'), the velocity (``v_prediction``) or the clean image (``sample``); without a scheduler, the noise.
    """

    def __init__(self, num_train_timesteps: int, condition_name: str = "condition", scheduler: Scheduler | None = None):
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name, scheduler=scheduler)

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        if self.condition_name not in batchdata:
            raise KeyError(f"batch has no {self.condition_name!r} entry (keys: {list(batchdata)})")
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        infer_kwargs["mode"] = "concat"
        return images, target, args, infer_kwargs


class ConditionInputPrepareBatch:
    """Evaluator ``prepare_batch``: the one-hot condition is the model input (the image is what gets generated)."""

    def __init__(self, condition_name: str = "condition"):
        self.condition_name = condition_name

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        return batchdata[self.condition_name].to(device=device, non_blocking=non_blocking, **kwargs), None


class MaskConditionedSampler(Inferer):
    """Inferer that generates images from one-hot condition channels: ``sampler(condition, network)``.

    Args:
        scheduler: ``DDPMScheduler`` (the faithful ancestral sampler; always all T steps) or a deterministic
            few-step scheduler such as ``brainsynth.schedulers.ddim.ExactDDIMScheduler``.
        out_channels: channels of the generated image (number of modalities).
        num_inference_steps: steps for a few-step scheduler; ``None`` = all training steps.
        progress: show a progress bar while sampling.
        seed: the run seed. Each item's noise (the starting noise and, for a stochastic scheduler, every step's)
            comes from its own generators seeded ``item_seeds[i]`` (``brainsynth.engine.seeding``; the
            evaluator's ``ItemSeedsPrepareBatch`` passes ``item_seed(seed, subject)``), so a volume depends on the
            seed and its item id alone, never on the batch, the shard or the calls before it. A call without
            ``item_seeds`` (MONAI Label's request, a training preview) uses ``item_seed(seed, str(i))`` for item
            ``i`` of the batch.
        amp: run the network under bf16 autocast (the bundle's ``amp`` key; the scheduler arithmetic stays fp32).
        mask_background: where every condition channel is off (outside the brain / head and the lesion) the output
            is set to ``background`` (the model's black), so the network's guess there, which nothing in the
            condition constrains, never shows as a grey frame.
        background: value written there (model intensity space).
        inside_threshold: a channel above it is on (the middle of the condition's value range).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        out_channels: int,
        num_inference_steps: int | None = None,
        progress: bool = True,
        seed: int = 0,
        amp: bool = False,
        mask_background: bool = False,
        background: float = -1.0,
        inside_threshold: float = 0.5,
    ):
        super().__init__()
        steps = scheduler.num_train_timesteps if num_inference_steps is None else int(num_inference_steps)
        if isinstance(scheduler, DDPMScheduler) and steps != scheduler.num_train_timesteps:
            raise ValueError(
                f"the ancestral DDPM sampler runs all {scheduler.num_train_timesteps} steps (MONAI's "
                f"DDPMScheduler is not a respaced sampler); got num_inference_steps={steps}. Use the "
                f"fast deterministic sampler for fewer steps."
            )
        scheduler.set_timesteps(steps)
        self.scheduler = scheduler
        self.inferer = DiffusionInferer(scheduler)
        self.out_channels = int(out_channels)
        self.progress = progress
        self.seed = int(seed or 0)
        self.amp = bool(amp)
        self.mask_background = bool(mask_background)
        self.background, self.inside_threshold = float(background), float(inside_threshold)

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args: Any,
        item_seeds: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Sample images for the one-hot ``inputs`` (B, classes, *spatial); item ``i``'s noise comes from
        ``item_seeds[i]`` alone (see ``seed``)."""
        from brainsynth.engine.seeding import item_noise, item_step_noise, seeds_of_batch

        condition = torch.as_tensor(inputs)
        item_seeds = seeds_of_batch(item_seeds, condition.shape[0], self.seed)
        shape = (self.out_channels, *condition.shape[2:])

        # only the network call is autocast: the scheduler's arithmetic and noise stay float32
        denoiser = Float32Output(network, condition, self.amp)

        def one(i: int, seed: int) -> torch.Tensor:  # each item alone, from its own noise
            return self.inferer.sample(
                input_noise=item_noise(shape, [seed], condition.device, condition.dtype),
                diffusion_model=denoiser,
                scheduler=item_step_noise(self.scheduler, [seed]),
                conditioning=condition[i : i + 1],
                mode="concat",
                verbose=self.progress,
            ).float()

        was_training = network.training
        network.eval()
        try:
            image = torch.cat([one(i, seed) for i, seed in enumerate(item_seeds)])
            if self.mask_background:
                inside = (condition > self.inside_threshold).any(dim=1, keepdim=True)
                image = torch.where(inside.to(image.device), image, torch.full_like(image, self.background))
        finally:
            network.train(was_training)
        if isinstance(inputs, MetaTensor):  # carry the mask's geometry and transform trace (for Invertd / saving)
            plain = image.as_tensor() if isinstance(image, MetaTensor) else image
            image = MetaTensor(plain).copy_meta_from(inputs)
        return image

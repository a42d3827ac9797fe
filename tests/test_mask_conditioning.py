"""Semantic mask conditioning: label maps, one-hot channels (values, order), validation, and the concatenation
that MONAI's DiffusionInferer performs during training and sampling."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.schedulers import DDPMScheduler
from monai.transforms import LoadImage

from brainsynth.conditioning.semantic_mask import (
    BRATS_CLASSES,
    WHOLE_HEAD_CLASSES,
    ConditionLabelsd,
    MaskConditionedPrepareBatch,
    MaskConditionedSampler,
    MaskError,
    MaskOneHotd,
    SemanticMaskConditioning,
)
from brainsynth.schedulers.ddim import ExactDDIMScheduler


def _toy_subject(shape=(12, 10, 8)):
    """Canonical seg (1 NCR, 2 ED, 3 ET) inside a brain box."""
    seg = np.zeros(shape, np.int16)
    brain = np.zeros(shape, np.uint8)
    brain[2:10, 2:8, 1:7] = 1
    seg[4:7, 3:6, 2:5] = 2
    seg[5, 4, 3] = 1
    seg[4, 3, 2] = 3
    return seg, brain


def test_brats_label_map_matches_authors_convention():
    seg, brain = _toy_subject()
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    lm = cond.label_map(seg, {"brain": brain}).numpy()
    # authors' BraTS mask: 1 NCR, 2 ED, 3 ET, 4 brain (brain only where there is no tumour), 0 outside
    expected = np.where(seg > 0, seg, np.where(brain > 0, 4, 0))
    np.testing.assert_array_equal(lm, expected)


def test_whole_head_label_map_merges_tumour():
    seg, brain = _toy_subject()
    cond = SemanticMaskConditioning(WHOLE_HEAD_CLASSES, value_range=(-1, 1))
    lm = cond.label_map(seg, {"head": brain}).numpy()
    np.testing.assert_array_equal(lm, np.where(seg > 0, 2, np.where(brain > 0, 1, 0)))


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_one_hot_values_and_channel_order(value_range):
    cond = SemanticMaskConditioning(BRATS_CLASSES, value_range=value_range)
    lm = torch.tensor([0, 1, 2, 3, 4, 4, 2]).view(1, 7, 1, 1)
    hot = cond.one_hot(lm)
    assert hot.shape == (4, 7, 1, 1)
    off, on = value_range
    assert set(torch.unique(hot).tolist()) == {off, on}
    for channel, name in enumerate(BRATS_CLASSES):
        on_at = (hot[channel, :, 0, 0] == on).nonzero().flatten().tolist()
        assert on_at == (lm[0, :, 0, 0] == channel + 1).nonzero().flatten().tolist(), name
    # background voxel: every channel off; each labelled voxel: exactly one channel on
    assert (hot[:, 0] == off).all()
    assert ((hot[:, 1:] == on).sum(0) == 1).all()
    # batched, channel axis 1, and the inverse
    batched = cond.one_hot(lm[None], channel_dim=1)
    assert batched.shape == (1, 4, 7, 1, 1)
    torch.testing.assert_close(batched[0], hot)
    torch.testing.assert_close(cond.from_one_hot(batched, channel_dim=1), lm[None].long())


def test_class_order_is_configurable():
    seg, brain = _toy_subject()
    reordered = SemanticMaskConditioning(("brain", "enhancing", "edema", "necrotic_core"))
    lm = reordered.label_map(seg, {"brain": brain})
    hot = reordered.one_hot(lm[None])
    assert torch.equal(hot[1] == 1, torch.as_tensor(seg == 3))
    assert torch.equal(hot[0] == 1, torch.as_tensor((brain > 0) & (seg == 0)))


def test_configuration_errors():
    with pytest.raises(ValueError, match="unknown conditioning class"):
        SemanticMaskConditioning(("brain", "skull"))
    with pytest.raises(ValueError, match="overlap"):
        SemanticMaskConditioning(("tumour", "edema"))
    with pytest.raises(ValueError, match="value_range"):
        SemanticMaskConditioning(BRATS_CLASSES, value_range=(1, 0))


def test_label_map_rejects_labels_it_cannot_represent():
    seg, brain = _toy_subject()
    seg[0, 0, 0] = 4  # an MS lesion: not a class of the BraTS variant
    seg_meta = MetaTensor(torch.as_tensor(seg), meta={"filename_or_obj": "/data/sub-7_seg.nii.gz"})
    with pytest.raises(MaskError, match=r"sub-7_seg\.nii\.gz: label\(s\) \[4\] in the segmentation"):
        SemanticMaskConditioning(BRATS_CLASSES).label_map(seg_meta, {"brain": brain})
    with pytest.raises(MaskError, match="needs a brain mask"):
        SemanticMaskConditioning(BRATS_CLASSES).label_map(_toy_subject()[0])


def _with_file(array, name):
    return MetaTensor(torch.as_tensor(array), meta={"filename_or_obj": name})


@pytest.mark.parametrize(
    "problem,array,match",
    [
        (
            "label outside the set",
            lambda lm: np.where(lm == 2, 7, lm),
            r"bad\.nii\.gz: label value\(s\) \[7\] are outside",
        ),
        ("2-D", lambda lm: lm[:, :, 3], r"bad\.nii\.gz: a condition mask must be a 3-D label map"),
        ("4 channels", lambda lm: np.stack([lm] * 4), r"bad\.nii\.gz: a condition mask must be a 3-D"),
        ("fractional", lambda lm: lm * 0.5, r"bad\.nii\.gz: mask has non-integer values"),
        ("no brain", lambda lm: np.where(lm == 4, 0, lm), r"bad\.nii\.gz: no brain voxels"),
    ],
)
def test_validate_names_file_and_problem(problem, array, match):
    seg, brain = _toy_subject()
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    lm = cond.label_map(seg, {"brain": brain}).numpy()
    cond.validate(_with_file(lm, "good.nii.gz"))  # the unmodified mask is fine
    with pytest.raises(MaskError, match=match):
        cond.validate(_with_file(array(lm), "/in/bad.nii.gz"))


def test_validate_shape_against_the_model_grid():
    seg, brain = _toy_subject((12, 10, 8))
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    lm = cond.label_map(seg, {"brain": brain})[None]
    cond.validate(lm, spatial_size=(16, 16, 16))  # padding keeps everything
    cond.validate(lm, spatial_size=(8, 8, 8))  # the brain box (8 x 6 x 6) survives a centre crop
    with pytest.raises(MaskError, match=r"does not match the model's grid \(4, 4, 4\)"):
        cond.validate(_with_file(lm, "m.nii.gz"), spatial_size=(4, 4, 4))


def test_transforms_on_a_real_nifti(tmp_path):
    seg, brain = _toy_subject()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for name, arr in (("seg", seg), ("brain", brain)):
        nib.save(nib.Nifti1Image(arr, affine), str(tmp_path / f"{name}.nii.gz"))
    load = LoadImage(image_only=True, ensure_channel_first=True)
    d = {"seg": load(tmp_path / "seg.nii.gz"), "brain_mask": load(tmp_path / "brain.nii.gz")}
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    d = ConditionLabelsd(cond, region_keys={"brain": "brain_mask"})(d)
    d = MaskOneHotd("mask", cond, output_keys="condition")(d)
    assert d["condition"].shape == (4, *seg.shape)
    np.testing.assert_allclose(d["condition"].affine.numpy(), affine)  # geometry travels with the condition
    assert str(d["mask"].meta["filename_or_obj"]).endswith("seg.nii.gz")
    np.testing.assert_array_equal(d["condition"][2].numpy(), (seg == 3).astype(np.float32))


class _Spy(torch.nn.Module):
    """Records what the denoiser is given; predicts zeros for out_channels."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels
        self.seen = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, context=None):
        self.seen.append((x.detach().clone(), timesteps.detach().clone()))
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:]) + self.w


def test_training_concatenates_condition_after_noisy_image():
    from monai.inferers import DiffusionInferer

    torch.manual_seed(0)
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    lm = torch.randint(0, 5, (2, 1, 6, 6, 6))
    batch = {"image": torch.rand(2, 4, 6, 6, 6) * 2 - 1, "condition": cond.one_hot(lm, channel_dim=1)}
    scheduler = DDPMScheduler(num_train_timesteps=250, schedule="cosine")
    images, target, args, kwargs = MaskConditionedPrepareBatch(250)(batch)
    assert kwargs["mode"] == "concat" and torch.equal(target, kwargs["noise"])
    spy = _Spy(4)
    DiffusionInferer(scheduler)(images, spy, *args, **kwargs)
    x, t = spy.seen[0]
    assert x.shape == (2, 8, 6, 6, 6)
    torch.testing.assert_close(x[:, :4], scheduler.add_noise(images, kwargs["noise"], kwargs["timesteps"]))
    torch.testing.assert_close(x[:, 4:], batch["condition"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_the_schedulers_prediction_type(prediction_type):
    # whatever the target, the clean image must be recoverable from it and the noisy input the network sees
    torch.manual_seed(1)
    scheduler = DDPMScheduler(num_train_timesteps=250, schedule="cosine", prediction_type=prediction_type)
    batch = {"image": torch.rand(3, 2, 5, 5, 5) * 2 - 1, "condition": torch.zeros(3, 4, 5, 5, 5)}
    images, target, _, kwargs = MaskConditionedPrepareBatch(250, scheduler=scheduler)(batch)
    t, noise = kwargs["timesteps"], kwargs["noise"]
    x_t = scheduler.add_noise(images, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    if prediction_type == "epsilon":
        x0 = (x_t - (1 - a).sqrt() * target) / a.sqrt()
        # ill-conditioned at the noisiest steps: compare where alpha_bar is not tiny
        keep = a.flatten() > 1e-2
        assert keep.any()  # the seed draws at least one such step, so the comparison is not empty
        torch.testing.assert_close(x0[keep], images[keep], atol=1e-3, rtol=0)
    elif prediction_type == "v_prediction":
        torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * target, images, atol=1e-5, rtol=0)
    else:
        assert torch.equal(target, images)


def test_training_target_refuses_an_unknown_prediction_type():
    scheduler = DDPMScheduler(num_train_timesteps=250, schedule="cosine")
    scheduler.prediction_type = "score"
    with pytest.raises(ValueError, match="prediction_type 'score'.*epsilon, v_prediction, sample"):
        MaskConditionedPrepareBatch(250, scheduler=scheduler)


@pytest.mark.parametrize(
    "scheduler,steps",
    [
        (DDPMScheduler(num_train_timesteps=250, schedule="cosine"), None),
        (ExactDDIMScheduler(num_train_timesteps=250, schedule="cosine"), 10),
    ],
)
def test_sampler_sees_condition_at_every_step(scheduler, steps):
    cond = SemanticMaskConditioning(WHOLE_HEAD_CLASSES, value_range=(-1, 1))
    condition = cond.one_hot(torch.randint(0, 3, (3, 1, 4, 4, 4)), channel_dim=1)
    condition = MetaTensor(condition, meta={"filename_or_obj": "m.nii.gz"})
    spy = _Spy(1)
    out = MaskConditionedSampler(scheduler, out_channels=1, num_inference_steps=steps, progress=False, seed=3)(
        condition, spy
    )
    expected_steps = 250 if steps is None else steps
    # each item is sampled alone (brainsynth.engine.seeding): every step once per item, item after item
    assert len(spy.seen) == 3 * expected_steps
    assert out.shape == (3, 1, 4, 4, 4) and isinstance(out, MetaTensor)
    for k, (x, _) in enumerate(spy.seen):
        item = k // expected_steps
        assert x.shape == (1, 3, 4, 4, 4)
        torch.testing.assert_close(x[:, 1:], condition.as_tensor()[item : item + 1])
    assert [int(t) for _, t in spy.seen] == scheduler.timesteps.tolist() * 3


def test_sampler_writes_background_where_the_condition_is_background():
    """Where every condition channel is off each voxel is exactly the background; elsewhere (brain or lesion)
    exactly the unmasked sample."""
    cond = SemanticMaskConditioning(WHOLE_HEAD_CLASSES, value_range=(-1, 1))
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    condition = cond.one_hot(labels, channel_dim=1)

    def run(**kwargs):
        scheduler = ExactDDIMScheduler(num_train_timesteps=250, schedule="cosine")
        return MaskConditionedSampler(scheduler, 1, num_inference_steps=5, progress=False, seed=1, **kwargs)(
            condition, _Spy(1)
        )

    plain = run()
    masked = run(mask_background=True, background=-1.0, inside_threshold=0.0)
    inside = labels > 0
    assert inside.any() and (~inside).any()
    assert torch.equal(masked[~inside], torch.full_like(masked[~inside], -1.0))
    assert torch.equal(masked[inside], plain[inside])
    assert not torch.equal(plain[~inside], masked[~inside])


def test_ancestral_sampler_refuses_fewer_steps():
    with pytest.raises(ValueError, match="runs all 250 steps"):
        MaskConditionedSampler(DDPMScheduler(num_train_timesteps=250, schedule="cosine"), 1, num_inference_steps=50)


def test_region_from_images_fills_only_missing_masks():
    from brainsynth.conditioning.semantic_mask import RegionFromImagesd

    t1 = torch.zeros(1, 6, 6, 6)
    t1[0, 1:4, 1:5, 2:5] = 3.0
    flair = torch.zeros(1, 6, 6, 6)
    flair[0, 4, 4, 4] = 1.0  # a voxel non-zero in one modality only still counts as brain
    out = RegionFromImagesd(["t1w", "flair"], output_keys="brain_mask")({"t1w": t1, "flair": flair})
    expected = (t1 != 0) | (flair != 0)
    assert torch.equal(out["brain_mask"].bool(), expected)
    given = torch.ones(1, 6, 6, 6, dtype=torch.uint8)
    kept = RegionFromImagesd(["t1w"], output_keys="brain_mask")({"t1w": t1, "brain_mask": given})
    assert kept["brain_mask"] is given


def test_a_raw_brats2021_segmentation_is_refused_as_a_condition_mask_with_the_conversion_hint():
    """Labels {0, 1, 2, 4} are all in 0..4, but read as a condition mask the enhancing tumour (4) becomes "brain" and
    the brain becomes background: the region check refuses it and says how to build a condition mask."""
    zz, yy, xx = torch.meshgrid(*(torch.arange(32.0),) * 3, indexing="ij")
    centre = ((zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2).sqrt()
    tumour = ((zz - 14) ** 2 + (yy - 18) ** 2 + (xx - 16) ** 2).sqrt()
    brain = centre < 13
    seg = torch.zeros(32, 32, 32, dtype=torch.int64)  # canonical labels: 1 necrotic core, 2 edema, 3 enhancing
    seg[tumour < 6] = 2
    seg[tumour < 4] = 3
    seg[tumour < 2] = 1
    cond = SemanticMaskConditioning(BRATS_CLASSES)
    good = cond.label_map(seg, {"brain": brain})
    cond.validate(good, source="good.nii.gz")  # a proper condition mask passes

    raw_2021 = torch.where(seg == 3, 4, seg)  # what the BraTS 2021 file holds
    with pytest.raises(MaskError) as err:
        cond.validate(raw_2021, source="BraTS2021_00000_seg.nii.gz")
    message = str(err.value)
    assert message.startswith("BraTS2021_00000_seg.nii.gz: this does not look like a condition mask")
    assert "label_map(" in message and "brain_mask" in message
    # a tumour that reaches the background over most of its border is refused even with a large brain elsewhere
    open_tumour = good.clone()
    open_tumour[brain & (tumour >= 6)] = 0
    open_tumour[(centre >= 13) & (centre < 15)] = 4
    with pytest.raises(MaskError, match="does not look like a condition mask"):
        cond.validate(open_tumour, source="open.nii.gz")

"""Tumour scaling and moving inside the brain (Med-DDPM's mask augmentation)."""

import json

import nibabel as nib
import numpy as np
import pytest
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)
from scipy import ndimage

bundle_scripts("brats_mri_med_ddpm")  # the bundle's own code, importable as brats_mri_med_ddpm_scripts
from brats_mri_med_ddpm_scripts.mask_augmentation import (  # noqa: E402
    PAPER_SCALE_FACTORS,
    augment_tumour,
    move_tumour,
    scale_tumour,
    tumour_inside,
    tumour_mask,
    write_augmented_masks,
)


def _subject(shape=(40, 40, 32), radius=5.0, centre=(20, 18, 16)):
    """A spherical brain with a layered tumour: enhancing rim (3) around necrosis (1), edema (2) outside."""
    grid = np.indices(shape).astype(float)
    brain = ((grid - np.array(shape).reshape(3, 1, 1, 1) / 2) ** 2).sum(0) <= 15.0**2
    r = np.sqrt(((grid - np.array(centre).reshape(3, 1, 1, 1)) ** 2).sum(0))
    seg = np.zeros(shape, np.int16)
    seg[r <= radius] = 2
    seg[r <= 0.7 * radius] = 3
    seg[r <= 0.4 * radius] = 1
    return seg, brain


def test_paper_factors():
    assert len(PAPER_SCALE_FACTORS) == 20
    assert PAPER_SCALE_FACTORS[0] == 2.0 and PAPER_SCALE_FACTORS[-1] == 0.5


@pytest.mark.parametrize("factor", [2.0, 1.5, 0.5])
def test_scaling_changes_volume_by_factor_cubed_and_keeps_centre(factor):
    seg, _ = _subject(radius=8.0)
    out = scale_tumour(seg, factor)
    before, after = tumour_mask(seg), tumour_mask(out)
    ratio = after.sum() / before.sum()
    assert abs(ratio / factor**3 - 1) < 0.2, ratio
    np.testing.assert_allclose(ndimage.center_of_mass(after), ndimage.center_of_mass(before), atol=0.75)
    # the layers scale too: each label keeps roughly its share of the tumour
    for label in (1, 2, 3):
        share_before = (seg == label).sum() / before.sum()
        share_after = (out == label).sum() / after.sum()
        assert abs(share_after - share_before) < 0.1, label
    assert set(np.unique(out)) <= {0, 1, 2, 3}


def test_scale_one_is_identity_and_bad_input_errors():
    seg, _ = _subject()
    np.testing.assert_array_equal(scale_tumour(seg, 1.0), seg)
    with pytest.raises(ValueError, match="positive"):
        scale_tumour(seg, 0.0)
    with pytest.raises(ValueError, match="no tumour"):
        scale_tumour(np.zeros_like(seg), 2.0)


def test_move_is_an_exact_shift():
    seg, _ = _subject()
    moved = move_tumour(seg, (3, -2, 1))
    np.testing.assert_array_equal(moved[3:, :-2, 1:], seg[:-3, 2:, :-1])
    assert tumour_mask(moved).sum() == tumour_mask(seg).sum()
    assert move_tumour(seg, (30, 0, 0)) is None  # would leave the volume


def test_augmented_tumours_stay_inside_the_brain():
    seg, brain = _subject()
    outputs = list(augment_tumour(seg, brain, factors=(2.0, 1.2, 0.5), rng=1))
    assert [o.factor for o in outputs] == [2.0, 1.2, 0.5]
    for o in outputs:
        assert tumour_inside(o.seg, brain)
        assert o.seg.shape == seg.shape and o.seg.dtype == seg.dtype
        # the tumour was really moved (random centre inside the brain) and scaled
        ratio = tumour_mask(o.seg).sum() / tumour_mask(seg).sum()
        assert abs(ratio / o.factor**3 - 1) < 0.3  # loose: a 2.5-voxel radius at 0.5x
    assert any(o.shift != (0, 0, 0) for o in outputs)
    # deterministic for a seed
    again = list(augment_tumour(seg, brain, factors=(2.0, 1.2, 0.5), rng=1))
    assert all(np.array_equal(a.seg, b.seg) for a, b in zip(outputs, again))


def test_a_tumour_too_big_for_the_brain_is_skipped():
    seg, _ = _subject(radius=6.0)
    small_brain = np.zeros(seg.shape, bool)
    small_brain[12:29, 10:27, 8:25] = True  # holds the 12-voxel tumour, not a 24-voxel one
    outputs = list(augment_tumour(seg, small_brain, factors=(2.0, 1.0), rng=0, max_tries=50))
    assert [o.factor for o in outputs] == [1.0]


def test_write_augmented_masks_round_trip(tmp_path):
    seg, brain = _subject()
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -120], [0, 0, 2.0, -60], [0, 0, 0, 1]])
    seg2021 = np.where(seg == 3, 4, seg)  # BraTS 2021 numbering: 4 = enhancing
    nib.save(nib.Nifti1Image(seg2021, affine), str(tmp_path / "s1_seg.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(tmp_path / "s1_brain_mask.nii.gz"))
    rows = [
        {
            "subject": "s1",
            "seg": str(tmp_path / "s1_seg.nii.gz"),
            "brain_mask": str(tmp_path / "s1_brain_mask.nii.gz"),
            "label_convention": "brats2021",
            "pathology": "glioblastoma",
        }
    ]
    datalist = write_augmented_masks(rows, tmp_path / "aug", factors=PAPER_SCALE_FACTORS, per_subject=4, seed=0)
    content = json.loads(datalist.read_text())
    assert content["label_convention"] == "canonical"
    written = content["augmented"]
    assert 1 <= len(written) <= 4
    assert all(row["scale"] in PAPER_SCALE_FACTORS and row["source_subject"] == "s1" for row in written)
    for row in written:
        img = nib.load(str(datalist.parent / row["seg"]))
        np.testing.assert_allclose(img.affine, affine)
        data = np.asarray(img.dataobj)
        assert set(np.unique(data)) <= {0, 1, 2, 3}  # canonical labels, 4 (2021's ET) became 3
        assert (data == 3).any()
        assert tumour_inside(data, brain)
    with pytest.raises(FileExistsError):
        write_augmented_masks(rows, tmp_path / "aug", per_subject=1)


def test_region_is_derived_from_images_when_no_mask_file(tmp_path):
    seg, brain = _subject()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1 = np.where(brain, 100.0, 0.0).astype(np.float32)  # skull-stripped: exactly zero outside the brain
    nib.save(nib.Nifti1Image(seg, affine), str(tmp_path / "s2_seg.nii.gz"))
    nib.save(nib.Nifti1Image(t1, affine), str(tmp_path / "s2_t1n.nii.gz"))
    rows = [{"subject": "s2", "seg": str(tmp_path / "s2_seg.nii.gz"), "t1w": str(tmp_path / "s2_t1n.nii.gz")}]
    with pytest.raises(ValueError, match="no brain_mask and no images"):
        write_augmented_masks(rows, tmp_path / "none", per_subject=1)
    datalist = write_augmented_masks(rows, tmp_path / "aug", per_subject=3, image_keys=["t1w"], seed=2)
    written = json.loads(datalist.read_text())["augmented"]
    region = np.asarray(nib.load(written[0]["brain_mask"]).dataobj)
    np.testing.assert_array_equal(region > 0, brain)
    for row in written:
        assert tumour_inside(np.asarray(nib.load(str(datalist.parent / row["seg"])).dataobj), brain)
    assert len({row["scale"] for row in written}) == len(written)  # distinct factors per subject

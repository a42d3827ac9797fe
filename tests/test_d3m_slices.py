"""D3M's 2-D slice pipeline: masks, slice selection and sampling, in-plane geometry, whole-volume synthesis."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)
from monai.data import MetaTensor

from brainsynth.engine.io import OutputExistsError

bundle_scripts("brats_mri_d3m_cemri")  # the bundle's own code, importable as brats_mri_d3m_cemri_scripts
from brats_mri_d3m_cemri_scripts.slices import (  # noqa: E402
    LabelMaskd,
    RandSliceSamplesd,
    SaveSynthesisd,
    SelectSlicesd,
    SliceSynthesisInferer,
    inplane_transform,
    label_values,
)


def test_label_mask_uses_canonical_names_and_values():
    seg = torch.tensor([[[[0, 1, 2, 3]]]])
    d = LabelMaskd("seg", "enhancing")({"seg": seg})
    assert d["mask"].flatten().tolist() == [-1, -1, -1, 1]
    d = LabelMaskd("seg", ["necrotic_core", "edema", "enhancing"], output_key="region", values=(0, 1))({"seg": seg})
    assert d["region"].flatten().tolist() == [0, 1, 1, 1]
    assert label_values(["edema", 3]) == [2, 3]
    with pytest.raises(ValueError, match="unknown label 'enhancin'"):
        label_values("enhancin")


def _volume(depth=6):
    cond = -torch.ones(3, 8, 8, depth)
    cond[:, 2:6, 2:6, 1:5] = 0.5  # brain in slices 1..4
    mask = -torch.ones(1, 8, 8, depth)
    mask[:, 3:5, 3:5, 2:4] = 1  # tumour in slices 2, 3
    image = torch.arange(depth, dtype=torch.float32).expand(2, 8, 8, depth).clone()
    return {"condition": cond, "mask": mask, "image": image, "subject": "s"}


@pytest.mark.parametrize("selection,expected", [("tumour", [2, 3]), ("brain", [1, 2, 3, 4]), ("all", list(range(6)))])
def test_select_slices_keeps_exactly_the_eligible_ones(selection, expected):
    d = SelectSlicesd(["image", "condition"], selection=selection)(_volume())
    assert d["slice_indices"] == expected
    assert d["image"][0, 0, 0].tolist() == [float(z) for z in expected]  # the kept slices, in order


def test_select_slices_without_tumour_is_an_error_naming_the_subject():
    v = _volume()
    v["mask"][:] = -1
    with pytest.raises(ValueError, match="subject s: no tumour slices"):
        SelectSlicesd(["image"], selection="tumour")(v)


def test_random_slices_are_uniform_reproducible_and_carry_their_index():
    d = SelectSlicesd(["image", "condition"], selection="brain")(_volume())
    sampler = RandSliceSamplesd(["image", "condition"], num_samples=400).set_random_state(7)
    samples = sampler(d)
    assert len(samples) == 400 and samples[0]["image"].shape == (2, 8, 8)
    assert all(s["image"][0, 0, 0].item() == s["slice"] for s in samples)  # the index names the slice drawn
    counts = np.bincount([s["slice"] for s in samples], minlength=6)
    assert counts[0] == counts[5] == 0 and counts[1:5].min() > 60  # uniform over the 4 eligible slices
    again = RandSliceSamplesd(["image", "condition"], num_samples=400).set_random_state(7)(d)
    assert [s["slice"] for s in again] == [s["slice"] for s in samples]


def test_inplane_pad_round_trip_is_exact_and_resize_keeps_depth():
    x = torch.randn(3, 50, 44, 5)
    padded = inplane_transform((64, 64), "pad")(x)
    assert padded.shape == (3, 64, 64, 5) and (padded[:, :7] == -1).all()
    back = inplane_transform((50, 44), "pad")(padded)
    torch.testing.assert_close(torch.as_tensor(back), x, atol=0, rtol=0)
    assert inplane_transform((64, 64), "resize")(x).shape == (3, 64, 64, 5)
    with pytest.raises(ValueError, match="in-plane mode"):
        inplane_transform((64, 64), "crop")


class _FakeSampler:
    """Stands in for MSSDMInferer.sample: the 'synthesis' is the noise plus the first condition channel."""

    def __init__(self):
        self.calls = []

    def sample(self, noise, network, conditioning, verbose=False, **kw):
        self.calls.append(noise.shape[0])
        return noise * 0.1 + conditioning[:, :1]


def test_whole_volume_synthesis_geometry_batching_and_determinism():
    torch.manual_seed(0)
    cond = -torch.ones(1, 3, 20, 18, 7)
    cond[:, :, 4:16, 3:15, 1:6] = torch.rand(1, 3, 12, 12, 5)
    net = torch.nn.Identity()
    fake = _FakeSampler()
    inferer = SliceSynthesisInferer(fake, spatial_size=(32, 32), slice_batch_size=2, num_samples=3, progress=False)
    meta_in = MetaTensor(cond, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = inferer(meta_in, net)
    assert isinstance(out, MetaTensor) and out.shape == (1, 3, 20, 18, 7)
    torch.testing.assert_close(out.affine, meta_in.affine)
    assert fake.calls == [1] * 15  # 5 brain slices x 3 samples, each slice sampled alone
    # empty slices (0 and 6) are background and were never sampled; the image follows the condition
    assert (out[0, 0, ..., 0] == -1).all() and (out[0, 0, ..., 6] == -1).all()
    # outside the head (every condition channel at background) the output is background too, with no spread
    assert (out[0, 0, :4, :, 1:6] == -1).all() and (out[0, 1:, :4, :, 1:6] == 0).all()
    inside = out[0, 0, 4:16, 3:15, 1:6]
    assert (inside - cond[0, 0, 4:16, 3:15, 1:6]).abs().max() < 0.5
    assert (out[0, 2, 4:16, 3:15, 1:6] > 0).all()  # spread over 3 samples of different noise
    # the same synthesis whatever the batch size (noise is seeded per volume, slice and sample), bit for bit
    again = SliceSynthesisInferer(
        _FakeSampler(), spatial_size=(32, 32), slice_batch_size=5, num_samples=3, progress=False
    )(cond, net)
    assert torch.equal(torch.as_tensor(again), torch.as_tensor(out))
    # a volume's seed comes with the batch (item_seed(seed, subject)); another seed, another synthesis
    other = inferer(meta_in, net, item_seeds=[12345])
    assert not torch.equal(torch.as_tensor(other), torch.as_tensor(out))


def test_save_synthesis_writes_in_reference_geometry_and_never_overwrites(tmp_path):
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    ref = tmp_path / "p_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), affine), ref)
    pred = torch.zeros(3, 6, 5, 4)
    pred[0] = 1.0
    pred[1, 2:4, 2:4, 1:3] = 1.0
    pred[2] = 0.2
    saver = SaveSynthesisd("pred", tmp_path / "out", reference_key="t1w", save_uncertainty=True)
    files = saver({"pred": pred, "t1w": str(ref), "subject": "p"})["pred_files"]
    image, mask, sd = (nib.load(files[k]) for k in ("image", "mask", "sd"))
    # the input is named in BraTS 2021 style (p_t1), so are the outputs
    assert [Path(files[k]).name for k in ("image", "mask", "sd")] == [
        "p_t1ce.nii.gz",
        "p_enhancing_predicted.nii.gz",
        "p_t1ce_sd.nii.gz",
    ]
    assert image.shape == (6, 5, 4) and np.allclose(image.affine, affine)
    assert np.allclose(image.get_fdata(), 1.0) and np.allclose(sd.get_fdata(), 0.1)  # [-1, 1] -> [0, 1]
    assert mask.get_data_dtype() == np.uint8 and int(mask.get_fdata().sum()) == 8
    with pytest.raises(OutputExistsError, match="already exist"):
        saver({"pred": pred, "t1w": str(ref), "subject": "p"})

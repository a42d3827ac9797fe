"""Generative metrics and the in-house feature network: numerical identities, settings that fit, round trips."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsynth.metrics.distribution import (
    conditioning_accuracy,
    diversity_ms_ssim,
    evaluate_generated,
    frechet_distance,
    maximum_mean_discrepancy,
    ms_ssim,
    ms_ssim_settings,
)
from brainsynth.metrics.feature_network import (
    FeatureExtractor,
    PathologyModalityNet,
    confusion_matrix,
    load_feature_network,
    prepare_volumes,
    random_pose,
    robust_rescale,
    train_feature_network,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_frechet_distance_of_a_shift_is_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 6))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    # same covariance, means differ by `shift`: the distance is exactly |shift|^2
    assert frechet_distance(a + shift, a) == pytest.approx(float(shift @ shift), rel=1e-6, abs=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_scaled_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 3))
    b = 2.0 * a
    cov, mu = np.cov(a, rowvar=False), a.mean(0)
    # means mu and 2 mu, covariances C and 4C: |mu|^2 + tr(C) + tr(4C) - 2 tr(sqrt(4 C^2)) = |mu|^2 + tr(C)
    assert frechet_distance(b, a) == pytest.approx(mu @ mu + np.trace(cov), rel=1e-6)


def test_mmd_matches_the_unbiased_linear_kernel_estimate_and_equalises_counts():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((10, 4))
    gen = rng.standard_normal((14, 4)) + 0.7
    g = gen[:10]  # the larger set is cut to the size of the smaller one
    kxx, kyy, kxy = real @ real.T, g @ g.T, g @ real.T
    m = 10
    expected = (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.sum() / (m * m)
    )
    assert maximum_mean_discrepancy(gen, real) == pytest.approx(expected, rel=1e-9)


def test_feature_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


def test_ms_ssim_settings_keep_five_scales_and_kernel_7_at_full_size():
    # MONAI's default kernel 11 fails at 128^3 (FACTS section 5); the fitted settings keep all five scales
    assert ms_ssim_settings((128, 128, 128)) == (7, pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333), rel=1e-3))


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 56, 40), (64, 72, 64)])
def test_ms_ssim_settings_fit_the_volume(shape):
    kernel, weights = ms_ssim_settings(shape)
    assert kernel % 2 == 1 and 3 <= kernel <= 7
    assert sum(weights) == pytest.approx(1.0)
    x = torch.rand(1, 1, *shape)
    assert float(ms_ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ms_ssim(x, torch.rand(1, 1, *shape))) < 0.5


def test_ms_ssim_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings((2, 32, 32))


def test_diversity_ms_ssim_is_one_for_identical_samples_and_lower_for_distinct_ones():
    base = torch.rand(1, 1, 24, 24, 24)
    assert diversity_ms_ssim(base.repeat(3, 1, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)
    distinct = torch.rand(4, 1, 24, 24, 24)
    manual = np.mean([float(ms_ssim(distinct[i], distinct[j])) for i, j in itertools.combinations(range(4), 2)])
    assert diversity_ms_ssim(distinct) == pytest.approx(manual, rel=1e-5)
    assert manual < 0.5
    # a deterministic subset of pairs when capped
    assert diversity_ms_ssim(distinct, max_pairs=3, seed=1) == diversity_ms_ssim(distinct, max_pairs=3, seed=1)


def test_robust_rescale_maps_any_scale_to_unit_range():
    x = torch.rand(2, 1, 8, 8, 8)
    y = robust_rescale(1000.0 * x + 50.0)
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    assert torch.allclose(y, robust_rescale(x), atol=1e-5)  # affine intensity changes do not matter
    assert prepare_volumes(np.zeros((10, 12, 14)), (8, 8, 8)).shape == (1, 1, 8, 8, 8)


class _FixedClassifier:
    has_heads = True
    name = "fixed"

    def __init__(self, pathology, modality):
        self.preds = {"pathology": pathology, "modality": modality}

    def classify(self, volumes):
        return self.preds


def test_conditioning_accuracy_counts_pathology_modality_and_both():
    clf = _FixedClassifier(["sclerosis", "sclerosis", "healthy", "sclerosis"], ["t1ce", "t2w", "t1ce", "t1ce"])
    acc = conditioning_accuracy(clf, [None] * 4, "sclerosis", "t1ce")
    assert acc == {"pathology_accuracy": 0.75, "modality_accuracy": 0.75, "joint_accuracy": 0.5}


def _toy_scans(tmp_path, n):
    """Pathology = a bright blob or not; modality = direction of an intensity gradient."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij"))
    rows = []
    for i in range(n):
        pathology, modality = ["healthy", "glioblastoma"][i % 2], ["t1w", "t2w"][(i // 2) % 2]
        v = grid[0] if modality == "t1w" else grid[1]
        v = v + 0.05 * rng.standard_normal(v.shape) + (3.0 * ((grid**2).sum(0) < 0.2) if i % 2 else 0.0)
        path = tmp_path / f"scan{i}.nii.gz"
        nib.save(nib.Nifti1Image(v.astype(np.float32), np.eye(4)), path)
        rows.append({"image": str(path), "pathology": pathology, "modality": modality})
    return rows


def test_feature_network_trains_saves_and_reloads_identically(tmp_path):
    rows = _toy_scans(tmp_path, 12)
    out = train_feature_network(
        rows[:8],
        tmp_path / "fn.pt",
        rows[8:],
        input_shape=(16, 16, 16),
        epochs=2,
        batch_size=4,
        augment=False,
        block_inplanes=(4, 8, 16, 32),
    )
    ckpt = torch.load(out, weights_only=True)  # loads with weights_only: no code in the file
    v = ckpt["validation"]
    assert set(v) == {
        "pathology_accuracy", "modality_accuracy", "n_scans", "pathology_confusion", "modality_confusion", "classes"
    }  # fmt: skip
    assert v["n_scans"] == 4
    for key in ("pathology", "modality"):  # the stored matrix is the accuracy's own count, not a separate guess
        m = np.asarray(v[f"{key}_confusion"])
        assert m.shape == (len(v["classes"][key]),) * 2 and m.sum() == 4
        assert np.trace(m) / 4 == pytest.approx(v[f"{key}_accuracy"])
    extractor = load_feature_network(out)
    vols = [nib.load(r["image"]).get_fdata() for r in rows[8:]]
    feats = extractor.extract(vols)
    assert feats.shape == (4, 32)
    net = PathologyModalityNet(**ckpt["config"])
    net.load_state_dict(ckpt["state_dict"])
    again = FeatureExtractor(net, (16, 16, 16), "copy", has_heads=True).extract(vols)
    assert torch.allclose(feats, again)
    preds = extractor.classify(vols)
    assert len(preds["pathology"]) == 4 and set(preds["modality"]) <= {"t1w", "t1ce", "t2w", "flair", "pd"}
    with pytest.raises(FileExistsError):
        train_feature_network(rows[:8], out, epochs=1)


def test_confusion_matrix_counts_each_pair():
    assert confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_random_pose_moves_voxels_but_keeps_the_brain_and_is_seeded():
    x = torch.zeros(4, 1, 16, 16, 16)
    x[:, :, 4:12, 5:11, 6:10] = 1.0
    a = random_pose(x, torch.Generator().manual_seed(3))
    b = random_pose(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # reproducible from the generator
    assert not torch.allclose(a, x)  # something moved
    # a small pose change keeps roughly the same amount of "brain" (scale within 10 %, intensity within 10 %)
    ratio = a.flatten(1).sum(1) / x.flatten(1).sum(1)
    assert ((ratio > 0.6) & (ratio < 1.5)).all()


def test_feature_network_rejects_unknown_labels_naming_the_file(tmp_path):
    rows = _toy_scans(tmp_path, 2)
    rows[1]["modality"] = "dwi"
    with pytest.raises(ValueError, match=r"scan1\.nii\.gz.*'dwi'"):
        train_feature_network(rows, tmp_path / "fn.pt", input_shape=(16, 16, 16), epochs=1)


def test_user_supplied_torchscript_network_gives_features_but_no_conditioning_accuracy(tmp_path):
    module = torch.jit.script(
        torch.nn.Sequential(torch.nn.Conv3d(1, 5, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
    )
    module.save(str(tmp_path / "user.pt"))
    extractor = load_feature_network(tmp_path / "user.pt")
    gen, real = torch.rand(4, 1, 20, 20, 20), torch.rand(5, 1, 20, 20, 20)
    result = evaluate_generated(extractor, gen, real, pathology="healthy", modality="t1w")
    assert result["feature_network"] == "user-supplied user.pt"
    assert result["n_generated"] == 4 and result["n_real"] == 5
    assert not any(k.startswith("conditioning_") for k in result)
    assert 0.0 <= result["diversity_ms_ssim"] <= 1.0
    with pytest.raises(ValueError, match="no pathology/modality heads"):
        extractor.classify(gen)


def test_missing_or_foreign_feature_network_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_feature_network(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a brainsynth feature-network checkpoint"):
        load_feature_network(tmp_path / "other.pt")

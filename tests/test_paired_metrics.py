"""Paired PSNR / SSIM (whole image and region, per slice and per volume) and the Wilcoxon comparison."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from scipy.stats import wilcoxon

from brainsynth.engine.io import OutputExistsError
from brainsynth.metrics.paired import (
    compare_methods,
    markdown_table,
    read_csv,
    slice_metrics,
    slice_rows,
    volume_metrics,
    wilcoxon_signed_rank,
    write_csv,
)


def _pair(n=3, h=32, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, h, w, generator=g)
    pred = (target + 0.1 * torch.randn(n, h, w, generator=g)).clamp(0, 1)
    return pred, target


def test_whole_image_values_equal_monai_metrics():
    pred, target = _pair()
    m = slice_metrics(pred, target)
    torch.testing.assert_close(m["psnr_whole"], PSNRMetric(max_val=1.0)(pred[:, None], target[:, None])[:, 0])
    torch.testing.assert_close(
        m["ssim_whole"], SSIMMetric(spatial_dims=2, data_range=1.0)(pred[:, None], target[:, None])[:, 0]
    )
    assert torch.isnan(m["psnr_region"]).all() and torch.isnan(m["ssim_region"]).all()


def test_region_metrics_only_see_the_region():
    pred, target = _pair(n=2)
    region = torch.zeros_like(pred, dtype=torch.bool)
    region[:, 10:20, 8:18] = True
    m = slice_metrics(pred, target, region)
    mse = ((pred - target) ** 2 * region).flatten(1).sum(1) / region.flatten(1).sum(1)
    torch.testing.assert_close(m["psnr_region"], 10 * torch.log10(1.0 / mse))
    # a perfect prediction inside the region, wrong outside: region PSNR infinite, SSIM 1, whole image not
    perfect_inside = torch.where(region, target, 1 - target)
    m2 = slice_metrics(perfect_inside, target, region)
    assert torch.isinf(m2["psnr_region"]).all() and m2["psnr_whole"].max() < 20
    # windows centred deep inside the region (region is 10 wide, window 11) still see outside pixels; a region
    # covering the whole image gives exactly the whole-image SSIM
    full = slice_metrics(pred, target, torch.ones_like(region))
    torch.testing.assert_close(full["ssim_region"], full["ssim_whole"])
    torch.testing.assert_close(full["psnr_region"], full["psnr_whole"])


def test_empty_region_slice_is_nan_and_volume_pooling_is_exact():
    pred, target = _pair(n=3)
    region = torch.zeros_like(pred, dtype=torch.bool)
    region[0, 5:25, 5:20] = True
    region[1, 12:16, 12:16] = True  # slice 2 has no region
    m = slice_metrics(pred, target, region)
    assert math.isnan(float(m["psnr_region"][2])) and math.isnan(float(m["ssim_region"][2]))
    vol = volume_metrics(m)
    all_sq = (pred - target) ** 2
    assert vol["psnr_whole"] == pytest.approx(float(10 * torch.log10(1 / all_sq.mean())), rel=1e-5)
    assert vol["psnr_region"] == pytest.approx(float(10 * torch.log10(1 / all_sq[region].mean())), rel=1e-5)
    # pooled SSIM is the voxel-weighted mean over slices, not the mean of slice means
    w = m["n_ssim_region"]
    assert vol["ssim_region"] == pytest.approx(float((m["ssim_region"].nan_to_num() * w).sum() / w.sum()), rel=1e-5)


def test_shape_errors_name_the_problem():
    pred, target = _pair()
    with pytest.raises(ValueError, match="differs from target shape"):
        slice_metrics(pred, target[:, :-1])
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        slice_metrics(pred[:, :8, :8], target[:, :8, :8])


def test_wilcoxon_matches_scipy_and_handles_ties():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=25), rng.normal(size=25)
    res = wilcoxon_signed_rank(a, b)
    assert res["p_value"] == pytest.approx(wilcoxon(a, b).pvalue) and res["n"] == 25
    assert wilcoxon_signed_rank(a, a)["p_value"] == 1.0
    better = wilcoxon_signed_rank(b + 1.0 + rng.uniform(0, 0.1, 25), b)
    assert better["p_value"] < 1e-4 and better["median_difference"] > 1.0
    with_nan = wilcoxon_signed_rank([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0])
    assert with_nan["n"] == 2


def test_compare_methods_pairs_units_and_formats_a_table(tmp_path):
    pred, target = _pair(n=6, seed=1)
    region = torch.ones_like(pred, dtype=torch.bool)
    good = slice_metrics(pred, target, region)
    bad = slice_metrics((pred + 0.1).clamp(0, 1), target, region)
    rows = slice_rows(good, "s1", range(6), "d3m") + slice_rows(bad, "s1", range(6), "baseline")
    write_csv(rows, tmp_path / "m.csv")
    with pytest.raises(OutputExistsError):
        write_csv(rows, tmp_path / "m.csv")
    back = read_csv(tmp_path / "m.csv")
    assert back[3]["slice"] == 3 and back[3]["psnr_whole"] == pytest.approx(rows[3]["psnr_whole"])
    summary = compare_methods(back, reference="d3m")
    assert [s["method"] for s in summary] == ["d3m", "baseline"]
    assert summary[0]["psnr_whole_mean"] > summary[1]["psnr_whole_mean"]
    assert summary[1]["psnr_whole_p"] == pytest.approx(
        wilcoxon([r["psnr_whole"] for r in rows[:6]], [r["psnr_whole"] for r in rows[6:]]).pvalue
    )
    table = markdown_table(summary)
    assert "| d3m | 6 |" in table and "ref." in table and "±" in table
    with pytest.raises(ValueError, match="different units"):
        compare_methods(back[:-1], reference="d3m")

"""Paired image-quality metrics for image-to-image synthesis: PSNR and SSIM over the whole image and inside a
region, per slice and per volume, and the paired Wilcoxon signed-rank test between methods.

Definitions (images scaled to [0, ``data_range``]):

* PSNR = 10 log10(data_range^2 / MSE); in a region the MSE runs over the region's voxels only.
* SSIM is MONAI's (``compute_ssim_and_cs``: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03). The whole-image value
  is the mean of the SSIM map (identical to ``monai.metrics.SSIMMetric``); the region value is the mean of the same
  map over windows centred on region voxels (windows that would leave the image have no value and are skipped).
* Per volume: the metrics of the pooled evaluated slices of one subject - PSNR from the MSE over all their
  (region) voxels, SSIM as the mean of their SSIM maps over all (region) window centres. Slices are the unit of
  the paper's table; volumes are the unit a patient-level claim needs.

``compare_methods`` pairs several methods' per-slice (or per-volume) rows by key and reports mean +- sd and the
Wilcoxon p-value of a reference method against each other method; ``markdown_table`` formats it.

Used by one bundle (D3M); kept in common because nothing in it knows D3M: it measures any paired synthesis (an
image-to-image bundle's evaluation, or a user's own comparison) with MONAI's SSIM.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

#: metric columns, in table order
METRICS: tuple[str, ...] = ("psnr_whole", "ssim_whole", "psnr_region", "ssim_region")
#: per-slice accumulators that make per-volume pooling exact
_SUMS: tuple[str, ...] = (
    "sse_whole",
    "n_whole",
    "ssim_sum_whole",
    "n_ssim_whole",
    "sse_region",
    "n_region",
    "ssim_sum_region",
    "n_ssim_region",
)


def _as_slices(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().float().cpu()
    if t.ndim == 2:
        t = t[None]
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 3:
        raise ValueError(f"{name}: expected (H, W), (N, H, W) or (N, 1, H, W) slices, got shape {tuple(t.shape)}")
    return t


def _psnr(sse: torch.Tensor, n: torch.Tensor, data_range: float) -> torch.Tensor:
    mse = sse / n.clamp(min=1)
    psnr = 10 * torch.log10(data_range**2 / mse)
    return torch.where(n > 0, psnr, torch.full_like(psnr, float("nan")))


def slice_metrics(
    pred: Any,
    target: Any,
    region: Any | None = None,
    data_range: float = 1.0,
    kernel_size: int = 11,
    kernel_sigma: float = 1.5,
) -> dict[str, torch.Tensor]:
    """Metrics of N paired 2-D slices (each (N,) tensors): ``METRICS`` plus the sums used to pool volumes.

    ``region`` is a boolean (N, H, W) mask (e.g. the tumour); without one, or where a slice's region is empty,
    the region metrics are NaN.
    """
    p, t = _as_slices(pred, "pred"), _as_slices(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}")
    if min(p.shape[1:]) < kernel_size:
        raise ValueError(f"slices of {tuple(p.shape[1:])} are smaller than the SSIM window ({kernel_size})")
    r = torch.zeros_like(p, dtype=torch.bool) if region is None else _as_slices(region, "region").bool()
    if r.shape != p.shape:
        raise ValueError(f"region shape {tuple(r.shape)} differs from image shape {tuple(p.shape)}")
    sq = (p - t).pow(2)
    ssim_map, _ = compute_ssim_and_cs(
        p[:, None],
        t[:, None],
        spatial_dims=2,
        kernel_size=[kernel_size] * 2,
        kernel_sigma=[kernel_sigma] * 2,
        data_range=data_range,
    )
    ssim_map = ssim_map[:, 0]
    half = kernel_size // 2
    r_centres = r[:, half : half + ssim_map.shape[1], half : half + ssim_map.shape[2]]
    n_pix = torch.full((p.shape[0],), float(p[0].numel()))
    out = {
        "sse_whole": sq.flatten(1).sum(1),
        "n_whole": n_pix,
        "ssim_sum_whole": ssim_map.flatten(1).sum(1),
        "n_ssim_whole": torch.full_like(n_pix, ssim_map[0].numel()),
        "sse_region": (sq * r).flatten(1).sum(1),
        "n_region": r.flatten(1).sum(1).float(),
        "ssim_sum_region": (ssim_map * r_centres).flatten(1).sum(1),
        "n_ssim_region": r_centres.flatten(1).sum(1).float(),
    }
    return {**finish(out, data_range), **out}


def finish(sums: Mapping[str, torch.Tensor], data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """``METRICS`` from (possibly pooled) accumulators."""
    nan = torch.tensor(float("nan"))
    ssim_region = torch.where(
        sums["n_ssim_region"] > 0, sums["ssim_sum_region"] / sums["n_ssim_region"].clamp(min=1), nan
    )
    return {
        "psnr_whole": _psnr(sums["sse_whole"], sums["n_whole"], data_range),
        "ssim_whole": sums["ssim_sum_whole"] / sums["n_ssim_whole"],
        "psnr_region": _psnr(sums["sse_region"], sums["n_region"], data_range),
        "ssim_region": ssim_region,
    }


def volume_metrics(per_slice: Mapping[str, torch.Tensor], data_range: float = 1.0) -> dict[str, float]:
    """Pool one subject's per-slice accumulators (from ``slice_metrics``) into per-volume metrics."""
    pooled = {k: torch.as_tensor(per_slice[k]).sum() for k in _SUMS}
    return {k: float(v) for k, v in finish(pooled, data_range).items()}


def slice_rows(
    metrics: Mapping[str, torch.Tensor], subject: str, slice_indices: Sequence[int], method: str
) -> list[dict[str, Any]]:
    """Per-slice CSV rows (``METRICS`` only) for one subject."""
    rows = []
    for i, s in enumerate(slice_indices):
        rows.append(
            {"method": method, "subject": subject, "slice": int(s), **{k: float(metrics[k][i]) for k in METRICS}}
        )
    return rows


# --- statistics ---------------------------------------------------------------------------------------------
def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired Wilcoxon signed-rank test of a against b (scipy.stats.wilcoxon); NaN pairs dropped.

    Returns {"n", "median_difference" (a - b), "statistic", "p_value"}; p = 1 when every difference is 0 and NaN
    when fewer than one usable pair remains.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length ({x.size} vs {y.size})")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    d = x - y
    out = {
        "n": int(d.size),
        "median_difference": float(np.median(d)) if d.size else float("nan"),
        "statistic": float("nan"),
        "p_value": float("nan"),
    }
    if d.size == 0:
        return out
    if not np.any(d != 0):
        out.update(statistic=0.0, p_value=1.0)
        return out
    res = wilcoxon(x, y, alternative="two-sided")
    out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
    return out


def _mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def compare_methods(
    rows: Sequence[Mapping[str, Any]],
    reference: str,
    key: Sequence[str] = ("subject", "slice"),
    metrics: Sequence[str] = METRICS,
) -> list[dict[str, Any]]:
    """Summarise per-unit rows of several methods, pairing every method with ``reference`` on ``key``.

    Every method must have exactly the reference's units (same subjects / slices), otherwise the test would not
    be paired: that is an error naming the first missing units. Returns one row per method with, per metric,
    ``<metric>_mean``, ``<metric>_sd``, ``<metric>_n`` and (other methods) ``<metric>_p`` and
    ``<metric>_median_diff`` (reference - method).
    """
    by_method: dict[str, dict[tuple, Mapping[str, Any]]] = {}
    for row in rows:
        unit = tuple(row[k] for k in key)
        table = by_method.setdefault(str(row["method"]), {})
        if unit in table:
            raise ValueError(f"method {row['method']}: duplicate row for {dict(zip(key, unit))}")
        table[unit] = row
    if reference not in by_method:
        raise ValueError(f"reference method {reference!r} has no rows (methods: {', '.join(by_method)})")
    ref_units = set(by_method[reference])
    order = [reference] + sorted(m for m in by_method if m != reference)
    summary = []
    for method in order:
        table = by_method[method]
        if set(table) != ref_units:
            missing = sorted(ref_units ^ set(table))[:3]
            raise ValueError(
                f"method {method} and reference {reference} were evaluated on different units "
                f"(e.g. {missing}); evaluate both on the same held-out subjects and slices"
            )
        units = sorted(ref_units)
        out: dict[str, Any] = {"method": method, "units": len(units)}
        for m in metrics:
            values = [float(table[u][m]) for u in units]
            out[f"{m}_mean"], out[f"{m}_sd"], out[f"{m}_n"] = _mean_sd(values)
            if method != reference:
                test = wilcoxon_signed_rank([float(by_method[reference][u][m]) for u in units], values)
                out[f"{m}_p"] = test["p_value"]
                out[f"{m}_median_diff"] = test["median_difference"]
        summary.append(out)
    return summary


# --- output -------------------------------------------------------------------------------------------------
_LABELS = {
    "psnr_whole": "Whole PSNR (dB)",
    "ssim_whole": "Whole SSIM (%)",
    "psnr_region": "Tumour PSNR (dB)",
    "ssim_region": "Tumour SSIM (%)",
}


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"


def markdown_table(
    summary: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS, region_label: str = "Tumour"
) -> str:
    """mean +- sd per method and metric (SSIM in %), with the paired Wilcoxon p-value against the first row."""
    labels = {m: _LABELS.get(m, m).replace("Tumour", region_label) for m in metrics}
    head = ["method", "n"] + [labels[m] for m in metrics] + [f"p ({labels[m].split(' (')[0]})" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        cells = [str(row["method"]), str(row["units"])]
        for m in metrics:
            scale = 100.0 if m.startswith("ssim") else 1.0
            mean, sd = row[f"{m}_mean"] * scale, row[f"{m}_sd"] * scale
            cells.append("n/a" if not math.isfinite(mean) else f"{mean:.2f} ± {sd:.2f}")
        cells += [_fmt_p(row[f"{m}_p"]) if f"{m}_p" in row else "ref." for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write dict rows as CSV, atomically (columns: union of keys in first-seen order)."""
    from brainsynth.engine.io import atomic_path

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics CSV, numeric columns as floats (slice as int)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                if k in ("method", "subject"):
                    parsed[k] = v
                elif k == "slice":
                    parsed[k] = int(v)
                else:
                    try:
                        parsed[k] = float(v)
                    except (TypeError, ValueError):
                        parsed[k] = v
            rows.append(parsed)
    return rows


def write_comparison(
    eval_dir: str | os.PathLike,
    methods: Sequence[str],
    reference: str,
    region_label: str = "Tumour",
    overwrite: bool = True,
) -> dict[str, str]:
    """Compare methods evaluated into ``eval_dir`` (``<method>_per_slice.csv`` / ``_per_volume.csv``).

    Writes ``comparison_per_slice.{csv,md}`` and ``comparison_per_volume.{csv,md}`` (mean +- sd, paired Wilcoxon
    of ``reference`` against each method) and returns the two Markdown tables. A method without its CSVs is an
    error naming the missing file.
    """
    from pathlib import Path

    from brainsynth.engine.io import atomic_write_text

    eval_dir = Path(eval_dir)
    methods = [reference] + [m for m in methods if m != reference]
    tables = {}
    for unit, key in (("slice", ("subject", "slice")), ("volume", ("subject",))):
        rows = []
        for method in methods:
            path = eval_dir / f"{method}_per_{unit}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found; run the 'evaluating' workflow with variant={method} first")
            rows += read_csv(path)
        summary = compare_methods(rows, reference, key=key)
        write_csv(summary, eval_dir / f"comparison_per_{unit}.csv", overwrite=overwrite)
        table = markdown_table(summary, region_label=region_label)
        atomic_write_text(eval_dir / f"comparison_per_{unit}.md", table, overwrite=overwrite)
        tables[unit] = table
    return tables

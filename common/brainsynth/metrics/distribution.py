"""Distribution and diversity metrics for generated 3D brain MRI.

- ``frechet_distance`` / ``maximum_mean_discrepancy``: MONAI ``FIDMetric`` / ``MMDMetric`` on features of a
  feature network (``brainsynth.metrics.feature_network``; the in-house one unless the user supplies another). Reports
  call them "Frechet distance (<network name> features)", never plain "FID": FID means Inception features.
- ``ms_ssim``: MONAI ``MultiScaleSSIMMetric`` with a kernel size and number of scales that fit the volume
  (the default kernel 11 with 5 scales needs more than 160 voxels per side; FACTS section 5).
- ``diversity_ms_ssim``: mean MS-SSIM over distinct pairs of generated samples (lower = more diverse).
- ``conditioning_accuracy``: how often the in-house network recognises the requested pathology and modality.
- ``evaluate_generated``: all of the above for one group of generated volumes against real ones.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch

#: MS-SSIM weights of Wang et al. (2003) for 5 scales; fewer scales use the first ones, renormalised
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _features(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double()
    if x.ndim != 2:
        raise ValueError(f"{what}: expected features of shape (N, F), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{what}: at least 2 feature vectors are needed, got {x.shape[0]}")
    return x


def frechet_distance(generated_features: Any, real_features: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (MONAI ``FIDMetric``), (N, F) each."""
    from monai.metrics import FIDMetric

    gen, real = _features(generated_features, "generated"), _features(real_features, "real")
    if gen.shape[1] != real.shape[1]:
        raise ValueError(f"feature sizes differ: generated {gen.shape[1]}, real {real.shape[1]}")
    return float(FIDMetric()(gen, real))


def maximum_mean_discrepancy(generated_features: Any, real_features: Any) -> float:
    """Unbiased MMD with a linear kernel on features (MONAI ``MMDMetric``).

    MONAI's metric needs equally many samples on both sides; the larger set is cut to the size of the smaller
    (first rows, so the result is deterministic for a given order).
    """
    from monai.metrics import MMDMetric

    gen, real = _features(generated_features, "generated"), _features(real_features, "real")
    n = min(gen.shape[0], real.shape[0])
    return float(MMDMetric()(real[:n], gen[:n]))  # MONAI's argument order is (y, y_pred)


def ms_ssim_settings(
    spatial_shape: Sequence[int], max_kernel: int = 7, preferred_min_kernel: int = 5, max_scales: int = 5
) -> tuple[int, tuple[float, ...]]:
    """The most scales (<= ``max_scales``) and then the largest odd kernel (<= ``max_kernel``) that fit the volume.

    Returns ``(kernel_size, weights)`` for ``MultiScaleSSIMMetric``. Kernels below ``preferred_min_kernel``
    (a 3-voxel window hardly measures structure) are used only when nothing larger fits. Follows MONAI's own
    size check (side // (scales - 1)**2 > kernel - 1) and keeps one kernel window at the coarsest scale.
    """
    smallest = min(int(s) for s in spatial_shape)
    top = max_kernel if max_kernel % 2 else max_kernel - 1
    for min_kernel in (preferred_min_kernel, 3):
        for scales in range(max_scales, 0, -1):
            div = max(1, scales - 1) ** 2
            for k in range(top, min_kernel - 1, -2):
                if smallest // div > k - 1 and smallest // 2 ** (scales - 1) >= k:
                    w = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
                    return k, tuple(float(v) for v in w / w.sum())
    raise ValueError(f"volume of shape {tuple(spatial_shape)} is too small for MS-SSIM (needs >= 3 voxels per side)")


def _as_batch(x: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float()
    if x.ndim == 3:
        x = x[None, None]
    elif x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5:
        raise ValueError(f"expected 3-D volumes (H, W, D), (B, H, W, D) or (B, C, H, W, D), got {tuple(x.shape)}")
    return x


def ms_ssim(x: Any, y: Any, data_range: float = 1.0, max_kernel: int = 7) -> torch.Tensor:
    """MS-SSIM per pair of volumes (B,), with settings fitted to the volume size (``ms_ssim_settings``)."""
    from monai.metrics import MultiScaleSSIMMetric

    x, y = _as_batch(x), _as_batch(y)
    if x.shape != y.shape:
        raise ValueError(f"MS-SSIM needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    kernel, weights = ms_ssim_settings(x.shape[2:], max_kernel=max_kernel)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel, weights=weights)
    return metric(x, y).reshape(-1)


def diversity_ms_ssim(
    samples: Any, data_range: float = 1.0, max_pairs: int | None = 200, seed: int = 0, max_kernel: int = 7
) -> float:
    """Mean MS-SSIM over distinct pairs of samples: 1 means identical samples (collapse), lower is more diverse.

    With more than ``max_pairs`` pairs a deterministic random subset (``seed``) is used.
    """
    x = _as_batch(samples)
    if x.shape[0] < 2:
        raise ValueError(f"diversity MS-SSIM needs at least 2 samples, got {x.shape[0]}")
    pairs = list(itertools.combinations(range(x.shape[0]), 2))
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    a = torch.stack([x[i] for i, _ in pairs])
    b = torch.stack([x[j] for _, j in pairs])
    return float(ms_ssim(a, b, data_range=data_range, max_kernel=max_kernel).mean())


def conditioning_accuracy(
    extractor, volumes: Any, pathology: str | None = None, modality: str | None = None
) -> dict[str, float]:
    """Fraction of volumes in which the in-house network recognises the requested pathology / modality
    (and both at once)."""
    preds = extractor.classify(volumes)
    n = len(preds["pathology"])
    out: dict[str, float] = {}
    hit_p = [p == pathology for p in preds["pathology"]] if pathology is not None else None
    hit_m = [m == modality for m in preds["modality"]] if modality is not None else None
    if hit_p is not None:
        out["pathology_accuracy"] = sum(hit_p) / n
    if hit_m is not None:
        out["modality_accuracy"] = sum(hit_m) / n
    if hit_p is not None and hit_m is not None:
        out["joint_accuracy"] = sum(p and m for p, m in zip(hit_p, hit_m)) / n
    return out


def evaluate_generated(
    extractor,
    generated: Any,
    real: Any,
    pathology: str | None = None,
    modality: str | None = None,
    real_features: torch.Tensor | None = None,
    max_pairs: int | None = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one group of generated volumes against real volumes of the same kind.

    ``generated`` / ``real``: lists or batches of single-channel volumes (any size; the feature network
    resizes them; ``real`` volumes must share one shape). Diversity MS-SSIM is computed among generated and,
    as the reference, among real volumes, after the same robust [0, 1] rescaling as the features. Keys name what they
    are; ``feature_network`` names the network.
    """
    from brainsynth.metrics.feature_network import prepare_volumes

    gen_f = extractor.extract(generated)
    real_f = extractor.extract(real) if real_features is None else real_features
    result: dict[str, Any] = {
        "feature_network": extractor.name,
        "n_generated": int(gen_f.shape[0]),
        "n_real": int(real_f.shape[0]),
    }
    result["feature_frechet_distance"] = frechet_distance(gen_f, real_f)
    result["feature_mmd"] = maximum_mean_discrepancy(gen_f, real_f)
    for key, volumes in (("diversity_ms_ssim", generated), ("real_diversity_ms_ssim", real)):
        batch = _as_batch(volumes)
        if batch.shape[0] >= 2:  # the real value is the reference: generated diversity should come close to it
            result[key] = diversity_ms_ssim(prepare_volumes(batch, batch.shape[2:]), max_pairs=max_pairs, seed=seed)
    if getattr(extractor, "has_heads", False) and (pathology or modality):
        result.update(
            {
                f"conditioning_{k}": v
                for k, v in conditioning_accuracy(extractor, generated, pathology, modality).items()
            }
        )
    return result

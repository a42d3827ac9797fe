"""Does a generator copy its training subjects? A nearest-neighbour audit usable by every bundle.

For each candidate volume (synthetic, or held-out real as the reference), its highest similarity to any training
subject: Pearson correlation over all channels inside the training subject's brain (its non-zero voxels), so the
background - exactly zero in real skull-stripped scans, not always in generated ones - neither inflates nor
deflates the figure, and every candidate is compared on the same voxels. Held-out real volumes show how similar
two *different* subjects of the same population can be; the largest of their nearest-training similarities is the
ceiling, and a synthetic volume above it is flagged as a possible copy of its nearest training subject.

Used by one bundle (Med-DDPM's study) so far; shared because it takes plain arrays and applies unchanged to any
generator's outputs (the LDM's and D3M's volumes), which is why it is not in a bundle's scripts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` (default: the reference ``b``'s non-zero voxels)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"masked_correlation: shapes {a.shape} and {b.shape} differ")
    mask = b != 0 if mask is None else np.asarray(mask, bool)
    x, y = a[mask], b[mask]
    if x.size < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def nearest_training_similarity(
    candidates: Mapping[str, np.ndarray], training: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """For each candidate: ``{"similarity": highest masked correlation to a training volume, "nearest": its id}``."""
    if not training:
        raise ValueError("nearest_training_similarity: no training volumes")
    out = {}
    for name, volume in candidates.items():
        scores = {t: masked_correlation(volume, ref) for t, ref in training.items()}
        nearest = max(scores, key=lambda t: -np.inf if np.isnan(scores[t]) else scores[t])
        out[name] = {"similarity": scores[nearest], "nearest": nearest}
    return out


def memorisation_audit(
    synthetic: Mapping[str, np.ndarray],
    held_out_real: Mapping[str, np.ndarray],
    training: Mapping[str, np.ndarray],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Nearest-training similarity of every synthetic and every held-out real volume; the ceiling is the held-out
    maximum and synthetic volumes above it are listed. ``groups`` (name -> synthetic ids) summarises subsets
    separately (e.g. volumes generated from training masks vs from augmented masks)."""
    if not held_out_real:
        raise ValueError("memorisation_audit: no held-out real volumes to set the ceiling")
    syn = nearest_training_similarity(synthetic, training)
    real = nearest_training_similarity(held_out_real, training)
    ceiling = max(v["similarity"] for v in real.values())

    def summary(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, np.float64)
        if a.size == 0:
            return {"n": 0}
        return {"n": int(a.size), "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                "min": float(a.min()), "max": float(a.max())}  # fmt: skip

    result: dict[str, Any] = {
        "measure": "Pearson correlation inside the training subject's brain (its non-zero voxels), all channels",
        "ceiling": ceiling,
        "held_out_real": {"summary": summary([v["similarity"] for v in real.values()]), "per_volume": real},
        "synthetic": {"summary": summary([v["similarity"] for v in syn.values()]), "per_volume": syn},
        "above_ceiling": sorted(k for k, v in syn.items() if v["similarity"] > ceiling),
        "groups": {},
    }
    for group, names in (groups or {}).items():
        values = [syn[n]["similarity"] for n in names if n in syn]
        result["groups"][group] = {
            "summary": summary(values),
            "similarities": values,
            "above_ceiling": sorted(n for n in names if n in syn and syn[n]["similarity"] > ceiling),
        }
    return result

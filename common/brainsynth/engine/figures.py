"""Study figures as PNG (matplotlib, the ``study`` extra): bars with error bars, histograms, curves.

Every function writes atomically and refuses to replace an existing file unless ``overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from brainsynth.engine.io import atomic_path


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("study figures need matplotlib: pip install matplotlib (or pip install -e '.[study]')") from e
    return plt


def save_figure(fig, path: str | os.PathLike, overwrite: bool) -> Path:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def bar_chart(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, tuple[float, float]]],
    ylabel: str,
    title: str,
    overwrite: bool = False,
) -> Path:
    """Grouped bars: ``groups[group][series] = (mean, sd)``, sd drawn as an error bar."""
    plt = pyplot()
    names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.7 * len(names) * max(1, len(series)) ** 0.5), 3.8))
    for k, s in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        means = [groups[g].get(s, (float("nan"), 0.0))[0] for g in names]
        sds = [groups[g].get(s, (float("nan"), 0.0))[1] for g in names]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=s if len(series) > 1 else None)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path, overwrite)


def histograms(
    path: str | os.PathLike,
    samples: Mapping[str, Sequence[float]],
    xlabel: str,
    title: str,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    overwrite: bool = False,
) -> Path:
    """Overlaid histograms of each named sample (shared bins), with an optional vertical threshold line."""
    import numpy as np

    plt = pyplot()
    values = [v for s in samples.values() for v in s if np.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 25)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, sample in samples.items():
        ax.hist([v for v in sample if np.isfinite(v)], bins=bins, alpha=0.55, label=f"{name} (n={len(sample)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=threshold_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("volumes")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path, overwrite)


def curves(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    overwrite: bool = False,
) -> Path:
    """Line plot of each named ``(x, y)`` series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), label=name, linewidth=1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path, overwrite)


def tensorboard_scalars(log_dir: str | os.PathLike, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar tag from the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        raise KeyError(f"{log_dir}: no scalar {tag!r} (has {', '.join(acc.Tags().get('scalars', [])) or 'none'})")
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]

"""Region contrast ratios: is a (generated) contrast physically right, readable without a viewer?

A ratio is the mean intensity of one region over that of white matter in the same image, e.g. CSF / WM is below 1
on T1w and FLAIR and above 1 on T2w; edema / WM above 1 on T2w and FLAIR; enhancing tumour / WM above 1 on T1ce
only. The side of 1 a ratio falls on is what separates the contrasts, so ``ratio_table`` prints a generated image's
ratios beside a real one's and marks every ratio on the other side of 1. Regions come from the cohort's ground
truth (``brainsynth.cohort.subject_regions``) or from the condition mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

#: (numerator region, denominator region) pairs reported by default
RATIOS: tuple[tuple[str, str], ...] = (("csf", "wm"), ("edema", "wm"), ("enhancing", "wm"))


def ratio_name(pair: Sequence[str]) -> str:
    return f"{pair[0]}/{pair[1]}"


def region_ratios(
    image: np.ndarray, regions: Mapping[str, np.ndarray], ratios: Sequence[Sequence[str]] = RATIOS
) -> dict[str, float | None]:
    """``{"csf/wm": mean(image[csf]) / mean(image[wm]), ...}``; None where a region is empty or the denominator's
    mean is not positive. ``image`` and every region share one grid (the image may carry a leading channel)."""
    image = np.asarray(image, dtype=np.float64)
    out: dict[str, float | None] = {}
    for top, bottom in ratios:
        a, b = regions.get(top), regions.get(bottom)
        if a is None or b is None:
            out[ratio_name((top, bottom))] = None
            continue
        a, b = np.broadcast_to(np.asarray(a, bool), image.shape), np.broadcast_to(np.asarray(b, bool), image.shape)
        den = image[b].mean() if b.any() else np.nan
        value = image[a].mean() / den if a.any() and den > 0 else np.nan
        out[ratio_name((top, bottom))] = float(value) if np.isfinite(value) else None
    return out


def mean_ratios(per_image: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean of each ratio over images, skipping the images where it is undefined (None if it never is)."""
    names = list(dict.fromkeys(k for r in per_image for k in r))
    out = {}
    for name in names:
        values = [r[name] for r in per_image if r.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def same_side(generated: float | None, real: float | None) -> bool | None:
    """Whether two ratios fall on the same side of 1 (None when either is undefined)."""
    if generated is None or real is None:
        return None
    return (generated - 1.0) * (real - 1.0) > 0


def ratio_table(
    generated: Mapping[str, Mapping[str, float | None]], real: Mapping[str, Mapping[str, float | None]]
) -> tuple[str, bool]:
    """Markdown table, one row per contrast, each cell ``generated (real)``; a ``!`` marks a ratio on the other
    side of 1 from the real one. Returns the table and whether every defined ratio is on the real one's side."""
    names = list(dict.fromkeys(k for r in real.values() for k in r))
    lines = ["| contrast | " + " | ".join(f"{n} generated (real)" for n in names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    agree = True
    for contrast, real_ratios in real.items():
        cells = []
        for name in names:
            g, r = generated.get(contrast, {}).get(name), real_ratios.get(name)
            side = same_side(g, r)
            agree &= side is not False
            text = "-" if g is None else f"{g:.2f}"
            cells.append(f"{text} ({'-' if r is None else f'{r:.2f}'}){' !' if side is False else ''}")
        lines.append(f"| {contrast} | " + " | ".join(cells) + " |")
    return "\n".join(lines), agree


def cohort_ratio_table(
    datalist_path: str | Path,
    generated: Mapping[str, Mapping[str, str | Path]],
    purity: float = 0.5,
    ratios: Sequence[Sequence[str]] = RATIOS,
) -> tuple[str, bool, dict, dict]:
    """Ratios of generated volumes beside those of the real scans of the same subjects of a simulated cohort.

    ``generated``: ``{subject: {contrast: path}}`` (NIfTI on the cohort's grid), contrasts named as the datalist's
    columns (``t1w``, ``t1ce``, ...). Regions are the subjects' ground truth (``subject_regions``; ``purity``: the
    share of a voxel a healthy tissue must fill, 0.5 because demo voxels are large). Each ratio is averaged over
    subjects. Returns (Markdown table, all on the real side of 1, generated means, real means)."""
    import json

    from brainsynth.cohort import subject_regions
    from brainsynth.data.reader import read_nifti

    datalist_path = Path(datalist_path)
    datalist = json.loads(datalist_path.read_text())
    rows = {r["subject"]: r for split in ("training", "validation", "test") for r in datalist.get(split, [])}
    per_gen: dict[str, list] = {}
    per_real: dict[str, list] = {}
    for subject, files in generated.items():
        if subject not in rows:
            raise ValueError(f"{datalist_path}: no subject {subject!r} to compare the generated volumes with")
        regions = subject_regions(datalist_path, subject, purity=purity)
        for contrast, path in files.items():
            image = read_nifti(str(path), np.float32)[0]
            real = read_nifti(str(datalist_path.parent / rows[subject][contrast]), np.float32)[0]
            if image.shape != real.shape:
                raise ValueError(f"{path}: shape {image.shape} differs from the real scan's {real.shape}")
            per_gen.setdefault(contrast, []).append(region_ratios(image, regions, ratios))
            per_real.setdefault(contrast, []).append(region_ratios(real, regions, ratios))
    gen = {c: mean_ratios(v) for c, v in per_gen.items()}
    real = {c: mean_ratios(v) for c, v in per_real.items()}
    table, agree = ratio_table(gen, real)
    return table, agree, gen, real


def print_ratio_table(title: str, table: str, agree: bool) -> None:
    """The demo's closing lines: the table and one verdict line (the last thing printed)."""
    print(f"\n{title}\n{table}", flush=True)
    verdict = "every ratio is on the real scans' side of 1" if agree else "ratios marked ! are on the other side of 1"
    print(f"contrast check: {verdict}", flush=True)

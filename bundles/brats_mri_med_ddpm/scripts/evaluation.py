"""The paper's image-quality table for volumes generated from real subjects' masks.

Per modality, generated volume vs the real volume of the same subject (same mask, same grid):

* MSE: both in [0, 1] (the real volume min-max scaled per volume, as the model's [-1, 1] training scale maps to
  the [0, 1] the outputs are written in), over the whole grid;
* MS-SSIM: paired, with a kernel and number of scales that fit the volume (``brainsynth.metrics.distribution``);
* MMD and Frechet distance between the sets of generated and real volumes, on features of a 3D network: the
  in-house pathology/modality ResNet trained on the real training split (MedicalNet weights cannot be
  downloaded here), or a user-supplied network; the table names the network. Both depend on the network and on
  the number of volumes, so the same two numbers between as many *real* volumes of other subjects
  (``reference_rows``, e.g. the validation split) and the real test volumes are reported beside them as the
  floor a perfect generator would reach.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from brainsynth.data import output_layout_of
from brainsynth.engine.io import atomic_write_text

from .inputs import output_paths

logger = logging.getLogger("med_ddpm.evaluation")


def _unit(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def feature_extractor(
    path: str | None,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict],
    out_path: str,
    input_shape: Sequence[int],
    epochs: int,
    seed: int,
    device: str | torch.device = "cpu",
):
    """The user's network when ``path`` is given, else the in-house one (trained once into ``out_path``)."""
    from brainsynth.data import expand_scans
    from brainsynth.metrics.feature_network import load_feature_network, train_feature_network

    if path:
        return load_feature_network(path, device=device)
    if not Path(out_path).is_file():
        logger.info("training the in-house feature network on %d real training subjects", len(train_rows))
        train_feature_network(
            expand_scans(train_rows),
            out_path,
            expand_scans(val_rows) if val_rows else None,
            input_shape=input_shape,
            epochs=epochs,
            seed=seed,
            device=str(device),
        )
    return load_feature_network(out_path, device=device)


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def evaluate_generation(
    real_rows: Sequence[dict],
    generated_dir: str,
    modalities: Sequence[str],
    out_dir: str,
    extractor: Any,
    reference_rows: Sequence[dict] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Metrics of generated vs real volumes; writes ``metrics.json`` and ``metrics.md`` into ``out_dir``."""
    from brainsynth.data import LoadSubjectd
    from brainsynth.metrics.distribution import frechet_distance, maximum_mean_discrepancy, ms_ssim

    out = Path(out_dir)
    for name in ("metrics.json", "metrics.md"):
        if (out / name).exists() and not overwrite:
            raise FileExistsError(f"{out / name}: already exists; set overwrite=true or choose another eval dir")
    load_real = LoadSubjectd(keys=list(modalities), seg_key=None)
    load_gen = LoadSubjectd(keys=list(modalities), seg_key=None)
    real, gen = {m: [] for m in modalities}, {m: [] for m in modalities}
    for row in real_rows:
        paths = output_paths(generated_dir, row["subject"], modalities, output_layout_of(row))
        missing = [str(paths[m]) for m in modalities if not paths[m].is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: generated volume missing for subject {row['subject']}")
        r = load_real(row)
        g = load_gen({"subject": row["subject"], **{m: str(paths[m]) for m in modalities}})
        for m in modalities:
            if r[m].shape != g[m].shape:
                raise ValueError(
                    f"{paths[m]}: shape {tuple(g[m].shape)} differs from the real {row[m]} {tuple(r[m].shape)}"
                )
            real[m].append(_unit(r[m].as_tensor()[0].float()))
            gen[m].append(g[m].as_tensor()[0].float().clamp(0, 1))
    result: dict[str, Any] = {
        "feature_network": extractor.name,
        "n_subjects": len(real_rows),
        "modalities": {},
        "n_reference_subjects": len(reference_rows or []),
    }
    references = {m: [] for m in modalities}
    for row in reference_rows or []:
        r = load_real(row)
        for m in modalities:
            references[m].append(_unit(r[m].as_tensor()[0].float()))
    for m in modalities:
        rs, gs = torch.stack(real[m]), torch.stack(gen[m])
        mse = ((gs - rs) ** 2).flatten(1).mean(1).tolist()
        msssim = ms_ssim(gs, rs, data_range=1.0).tolist()
        entry = {"mse": _mean_sd(mse), "ms_ssim": _mean_sd(msssim)}
        if len(real_rows) >= 2:
            fr, fg = extractor.extract(rs), extractor.extract(gs)
            entry["feature_mmd"] = maximum_mean_discrepancy(fg, fr)
            entry["feature_frechet_distance"] = frechet_distance(fg, fr)
            if len(references[m]) >= 2:  # real vs real: what the same numbers are for two sets of real scans
                fref = extractor.extract(torch.stack(references[m]))
                entry["reference_feature_mmd"] = maximum_mean_discrepancy(fref, fr)
                entry["reference_feature_frechet_distance"] = frechet_distance(fref, fr)
        result["modalities"][m] = entry
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1), overwrite=overwrite)
    atomic_write_text(out / "metrics.md", metrics_table(result), overwrite=overwrite)
    logger.info("\n%s", metrics_table(result))
    return result


def metrics_table(result: dict[str, Any]) -> str:
    name = result["feature_network"]

    def num(value):
        return "n/a" if value is None else f"{value:.4g}"

    lines = [
        f"Generated vs real, {result['n_subjects']} subjects (same masks). MSE and MS-SSIM paired per subject "
        f"(mean +- sd), intensities in [0, 1]; MMD and Frechet distance on features of the {name}; in "
        f"brackets the same between {result.get('n_reference_subjects', 0)} other real subjects and the real "
        f"test scans (the floor for a perfect generator).",
        "",
        f"| modality | MSE | MS-SSIM | MMD ({name}) [real vs real] | Frechet distance ({name}) [real vs real] |",
        "|---|---|---|---|---|",
    ]
    for m, e in result["modalities"].items():
        lines.append(
            f"| {m} | {e['mse']['mean']:.4f} +- {e['mse']['sd']:.4f} | {e['ms_ssim']['mean']:.4f} +- "
            f"{e['ms_ssim']['sd']:.4f} | {num(e.get('feature_mmd'))} [{num(e.get('reference_feature_mmd'))}] "
            f"| {num(e.get('feature_frechet_distance'))} "
            f"[{num(e.get('reference_feature_frechet_distance'))}] |"
        )
    return "\n".join(lines) + "\n"

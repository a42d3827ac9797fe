"""Conditional sampling from a latent diffusion model with MONAI's ``SupervisedEvaluator``.

One row of the evaluator's dataset is one requested volume ``{"pathology", "modality", "condition", "seed",
"name"}`` (``condition_requests``: one combination, or the whole pathology x modality grid). For each batch
``NoisePrepareBatch`` draws the starting latent noise from each row's own seed, ``item_seed(seed, name)``
(``brainsynth.engine.seeding``: a volume depends on the run seed and its name alone, not on the batch size, the
other requests or the shard), ``LatentSampler`` runs MONAI's ``LatentDiffusionInferer.sample`` with the guided
denoiser and decodes with the autoencoder's stored scale factor, ``SaveGeneratedd`` writes each volume as NIfTI
(atomically, never over an earlier output) and ``SampleMontage`` writes a PNG grid when the run completes.
``evaluate_conditions`` scores the generated volumes per combination against real scans.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.engines import PrepareBatch
from monai.inferers import Inferer, LatentDiffusionInferer
from monai.transforms import MapTransform

from brainsynth.conditioning.categorical import CategoricalConditioning, all_combinations
from brainsynth.engine.acceleration import Float32Output, autocast
from brainsynth.engine.io import atomic_write_text, save_nifti
from brainsynth.engine.seeding import is_stochastic, item_noise, item_seed, item_step_noise
from brainsynth.engine.training import unwrap

logger = logging.getLogger(__name__)


def condition_requests(
    conditioning: CategoricalConditioning,
    pathology: str | None = None,
    modality: str | None = None,
    num_samples: int = 1,
    grid: bool = False,
    combinations: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Rows for the sampler: ``num_samples`` volumes of one combination, of each listed combination, or of every
    combination (``grid=True``). Names are validated here, before any sampling starts."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    names = conditioning.names
    if grid:
        combos = [tuple(c[n] for n in names) for c in all_combinations(conditioning)]
    elif combinations:
        combos = [tuple(c) for c in combinations]
    else:
        combos = [(pathology, modality)] if names == ("pathology", "modality") else None
        if combos is None:
            raise ValueError(f"give `combinations` (one value per condition {list(names)}) or grid=True")
    rows = []
    for combo in combos:
        if len(combo) != len(names):
            raise ValueError(f"combination {combo!r} must give one value per condition {list(names)}")
        idx = conditioning.encode(dict(zip(names, combo)))
        resolved = conditioning.decode(idx)
        label = "_".join(resolved[n] or "any" for n in names)
        for k in range(int(num_samples)):
            rows.append(
                {
                    **{n: (resolved[n] or "any") for n in names},
                    "condition": idx,
                    "sample": k,
                    # the volume's seed: (run seed, name) alone, whatever else is requested, batched or sharded
                    "seed": item_seed(seed, f"{label}_{k:03d}"),
                    "name": f"{label}_{k:03d}",
                }
            )
    return rows


class NoisePrepareBatch(PrepareBatch):
    """Evaluator ``prepare_batch``: (latent noise from each row's seed, no target, condition as kwargs)."""

    def __init__(self, latent_shape: Sequence[int], condition_name: str = "condition", seed_key: str = "seed") -> None:
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.condition_name = condition_name
        self.seed_key = seed_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ):
        seeds = torch.as_tensor(batchdata[self.seed_key]).reshape(-1).tolist()
        noise = item_noise(self.latent_shape, seeds, device)
        condition = torch.as_tensor(batchdata[self.condition_name]).long().to(device)
        return noise, None, (), {"conditioning": condition, "item_seeds": [int(s) for s in seeds]}


class LatentSampler(Inferer):
    """``inferer(noise, guided_denoiser, conditioning=...) -> images``: MONAI ``LatentDiffusionInferer.sample``
    with ``num_inference_steps`` steps of ``scheduler`` and the autoencoder's stored latent scale factor.
    ``amp``: run the denoiser and the decoder under bf16 autocast (the bundle's ``amp`` key)."""

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        scheduler: Any,
        num_inference_steps: int = 50,
        verbose: bool = True,
        amp: bool = False,
    ) -> None:
        super().__init__()
        self.amp = bool(amp)
        self.autoencoder = autoencoder
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.verbose = verbose

    def __call__(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        *args: Any,
        conditioning: torch.Tensor | None = None,
        item_seeds: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``item_seeds``: one per volume (``NoisePrepareBatch`` passes the rows' seeds); a stochastic scheduler
        (DDIM with eta > 0) draws each volume's per-step noise from its own (``brainsynth.engine.seeding``)."""
        ae = unwrap(self.autoencoder).eval()
        # timesteps stay on the CPU: MONAI 1.6.1's DiffusionInferer.sample concatenates them with a CPU tensor and
        # fails on CUDA otherwise (found by ci/gpu_check.sh); it moves each timestep to the input's device itself
        self.scheduler.set_timesteps(self.num_inference_steps)
        inferer = LatentDiffusionInferer(self.scheduler, scale_factor=ae.scale_factor())
        if item_seeds is None and is_stochastic(self.scheduler):
            raise ValueError("a stochastic scheduler needs item_seeds (one per volume) to draw its per-step noise")

        # the decoder runs under this autocast; the denoiser's output comes back float32, so the scheduler's
        # arithmetic stays float32 (elementwise operations are not autocast)
        denoiser = Float32Output(network, inputs, self.amp)

        def one(i: int, seed: int | None) -> torch.Tensor:  # each volume alone (brainsynth.engine.seeding)
            with autocast(inputs, self.amp):
                return inferer.sample(
                    input_noise=inputs[i : i + 1],
                    autoencoder_model=ae,
                    diffusion_model=denoiser,
                    scheduler=self.scheduler if seed is None else item_step_noise(self.scheduler, [seed]),
                    conditioning=None if conditioning is None else conditioning[i : i + 1],
                    mode="crossattn",
                    verbose=self.verbose,
                ).float()

        seeds = [None] * inputs.shape[0] if item_seeds is None else [int(s) for s in item_seeds]
        return torch.cat([one(i, seed) for i, seed in enumerate(seeds)])


def pixdim_affine(pixdim: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS affine of a generated volume: voxel size ``pixdim``, centred on the origin."""
    affine = np.diag([float(p) for p in pixdim] + [1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape[:3]) - 1) * np.asarray(pixdim, dtype=float)
    return affine


class SaveGeneratedd(MapTransform):
    """Write ``data[key]`` (1, H, W, D) to ``<output_dir>/<data[name_key]>.nii.gz`` atomically; an existing file
    is an error unless ``overwrite``. Records the path under ``<key>_path``."""

    def __init__(
        self,
        keys: str = "pred",
        output_dir: str | os.PathLike = "outputs",
        pixdim: Sequence[float] = (1, 1, 1),
        name_key: str = "name",
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        condition_keys: Sequence[str] = ("pathology", "modality"),
    ) -> None:
        """``provenance``: the run's settings for the synthetic mark (``brainsynth.data.provenance.RunProvenance``,
        plus ``autoencoder`` for the second weight file); every volume is marked with its row's conditions and
        seed."""
        from brainsynth.data.provenance import RunProvenance, sha256_file

        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.pixdim = tuple(pixdim)
        self.name_key = name_key
        self.overwrite = overwrite
        settings = dict(provenance or {})
        autoencoder = settings.pop("autoencoder", None)
        self.provenance = RunProvenance(Path(__file__).resolve().parents[1], **settings)
        self.autoencoder_sha256 = sha256_file(autoencoder) if autoencoder and Path(autoencoder).is_file() else None
        self.condition_keys = list(condition_keys)

    def __call__(self, data: Mapping[str, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = torch.as_tensor(d[key]).detach().float().cpu()[0]
            path = self.output_dir / f"{d[self.name_key]}.nii.gz"
            if not torch.isfinite(volume).all():
                raise FloatingPointError(
                    f"{d[self.name_key]}: the generated volume is not finite (NaN / Inf); nothing "
                    f"was written. Likely damaged weights ({self.provenance.weights})"
                )
            record = self.provenance.record(
                {k: d.get(k) for k in self.condition_keys if k in d},
                volume_seed=d.get("seed"),
                autoencoder_sha256=self.autoencoder_sha256,
            )
            save_nifti(
                volume.numpy(),
                path,
                affine=pixdim_affine(self.pixdim, volume.shape),
                overwrite=self.overwrite,
                provenance=record,
            )
            d[f"{key}_path"] = str(path)
        return d


class SampleMontage:
    """Ignite handler: keeps up to ``max_per_cell`` generated volumes per (pathology, modality) (the configs pass
    num_samples: every generated volume is shown) and, when the run
    completes, writes one PNG with ``brainsynth.engine.preview.save_montage``: a row per pathology (and sample), a
    column per modality, one axial slice through the brain centre."""

    def __init__(
        self,
        path: str | os.PathLike,
        key: str = "pred",
        row_key: str = "pathology",
        col_key: str = "modality",
        pixdim: Sequence[float] = (1.0, 1.0, 1.0),
        overwrite: bool = False,
        max_per_cell: int = 2,
    ) -> None:
        self.path = Path(path)
        self.key, self.row_key, self.col_key = key, row_key, col_key
        self.pixdim = tuple(float(p) for p in pixdim)
        self.overwrite = overwrite
        self.max_per_cell = int(max_per_cell)
        self.cells: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)

    def collect(self, engine) -> None:
        # after MONAI's decollation: batch rows carry the request, output rows the generated volume
        for row, item in zip(engine.state.batch, engine.state.output):
            cell = self.cells[(str(row[self.row_key]), str(row[self.col_key]))]
            if len(cell) < self.max_per_cell:
                cell.append(torch.as_tensor(item[self.key]).detach().float().cpu()[0].numpy().astype(np.float16))

    def write(self, engine=None) -> Path | None:
        if not self.cells:
            return None
        from brainsynth.engine.preview import save_montage

        rows = list(dict.fromkeys(r for r, _ in self.cells))
        cols = list(dict.fromkeys(c for _, c in self.cells))
        shape = next(iter(self.cells.values()))[0].shape
        subjects = []
        for r in rows:
            for k in range(max(len(self.cells.get((r, c), [])) for c in cols)):
                vols = {
                    c: (
                        self.cells[(r, c)][k].astype(np.float32)
                        if k < len(self.cells.get((r, c), []))
                        else np.zeros(shape, np.float32)
                    )
                    for c in cols
                }  # blank where nothing was asked
                subjects.append({"volumes": vols, "title": r if k == 0 else f"{r} #{k + 1}", "spacing": self.pixdim})
        save_montage(subjects, self.path, modalities=cols, overwrite=self.overwrite)
        logger.info("montage of %d combination(s) written to %s", len(self.cells), self.path)
        return self.path

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)


def check_output_dir(
    output_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    overwrite: bool = False,
    extra_files: Sequence[str] = (),
) -> Path:
    """Fail before sampling if any output of this run (a volume per row, plus ``extra_files``) already exists:
    outputs never replace earlier ones unless asked. Creates nothing (initialize must have no side effects: the
    writers make the folder)."""
    output_dir = Path(output_dir)
    if not overwrite:
        names = [f"{r['name']}.nii.gz" for r in rows] + [str(f) for f in extra_files if f]
        clash = [str(output_dir / n) for n in names if (output_dir / n).exists()]
        if clash:
            raise FileExistsError(
                f"{len(clash)} output(s) already exist, e.g. {clash[0]}; choose another output_dir "
                "or pass --overwrite true"
            )
    return output_dir


def _load_volume(path: str | os.PathLike) -> np.ndarray:
    from brainsynth.data.reader import read_nifti

    return read_nifti(str(path), np.float32)[0]


def evaluate_conditions(
    requests: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    real_rows: Sequence[Mapping[str, Any]],
    real_transform: Any,
    extractor: Any,
    held_out: Sequence[Sequence[str]] | None,
    report_dir: str | os.PathLike,
    max_real_per_combination: int | None = None,
    max_pairs: int | None = 200,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score generated volumes per (pathology, modality) combination against real scans of that combination.

    ``requests``: the sampler rows (their volumes are read from ``output_dir``); ``real_rows``: per-scan rows
    (``image``, ``pathology``, ``modality``) loaded and preprocessed by ``real_transform`` exactly as training
    images were; ``held_out``: the combinations left out of training. Writes ``metrics.json`` and
    ``metrics.md`` (a table, seen and held-out marked) under ``report_dir`` and returns the results.
    """
    from brainsynth.data.provenance import refuse_synthetic
    from brainsynth.metrics.distribution import evaluate_generated

    real_rows = refuse_synthetic(real_rows, "the real reference scans of the evaluation", keys=["image"])
    held = {(str(p).lower(), str(m).lower()) for p, m in (held_out or [])}
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in requests:
        groups[(r["pathology"], r["modality"])].append(str(Path(output_dir) / f"{r['name']}.nii.gz"))
    real_by_combo: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in real_rows:
        real_by_combo[(r["pathology"], r["modality"])].append(r)
    results = []
    for (pathology, modality), paths in groups.items():
        generated = np.stack([_load_volume(p) for p in paths])
        refs = real_by_combo.get((pathology, modality), [])
        if max_real_per_combination:
            refs = refs[: int(max_real_per_combination)]
        entry: dict[str, Any] = {
            "pathology": pathology,
            "modality": modality,
            "split": "held-out" if (pathology, modality) in held else "seen",
            "n_generated": len(paths),
            "n_real": len(refs),
        }
        if len(refs) >= 2 and len(paths) >= 2:
            real = np.stack([np.asarray(real_transform(dict(r))["image"])[0] for r in refs])
            entry.update(
                evaluate_generated(extractor, generated, real, pathology, modality, max_pairs=max_pairs, seed=seed)
            )
        else:  # too few scans for a distribution metric: keep what can be measured honestly
            from brainsynth.metrics.distribution import conditioning_accuracy, diversity_ms_ssim
            from brainsynth.metrics.feature_network import prepare_volumes

            entry["feature_network"] = extractor.name
            if len(paths) >= 2:
                entry["diversity_ms_ssim"] = diversity_ms_ssim(
                    prepare_volumes(generated, generated.shape[1:]), max_pairs=max_pairs, seed=seed
                )
            if getattr(extractor, "has_heads", False):
                entry.update(
                    {
                        f"conditioning_{k}": v
                        for k, v in conditioning_accuracy(extractor, generated, pathology, modality).items()
                    }
                )
            entry["note"] = "fewer than 2 real or generated volumes: no feature distance"
        results.append(entry)
        logger.info(
            "%s / %s (%s): %s",
            pathology,
            modality,
            entry["split"],
            {k: v for k, v in entry.items() if isinstance(v, float)},
        )
    report = {
        "feature_network": getattr(extractor, "name", "?"),
        "feature_network_validation": dict(getattr(extractor, "validation", {}) or {}),
        "combinations": results,
    }
    report_dir = Path(report_dir)
    atomic_write_text(report_dir / "metrics.json", json.dumps(report, indent=2), overwrite=overwrite)
    atomic_write_text(report_dir / "metrics.md", metrics_table(report), overwrite=overwrite)
    return report


def metrics_table(report: Mapping[str, Any]) -> str:
    """Markdown table of ``evaluate_conditions`` results; column names say what each number is."""
    cols = [
        ("feature_frechet_distance", "Frechet distance ({net} features)"),
        ("feature_mmd", "MMD ({net} features)"),
        ("diversity_ms_ssim", "MS-SSIM among generated"),
        ("real_diversity_ms_ssim", "MS-SSIM among real"),
        ("conditioning_pathology_accuracy", "pathology recognised"),
        ("conditioning_modality_accuracy", "modality recognised"),
        ("conditioning_joint_accuracy", "both recognised"),
    ]
    net = report.get("feature_network", "?")
    head = ["pathology", "modality", "split", "n gen", "n real"] + [c[1].format(net=net) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in sorted(report["combinations"], key=lambda e: (e["split"] != "held-out", e["pathology"], e["modality"])):
        vals = [e["pathology"], e["modality"], e["split"], str(e["n_generated"]), str(e["n_real"])]
        vals += [f"{e[k]:.3f}" if isinstance(e.get(k), float) else "-" for k, _ in cols]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def print_demo_ratios(
    output_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    dataset_dir: str | os.PathLike,
    pixdim: Sequence[float],
    spatial_size: Sequence[int],
    n_reference: int = 8,
) -> dict:
    """The demo's last words: for each generated modality, CSF and grey matter over white matter, beside the same
    ratios of real scans of that modality, so a user can see without a viewer whether the columns differ as the
    real contrasts do. Generated volumes belong to no subject, so the regions are the cohort's consensus: voxels
    where a region holds in at least half of ``n_reference`` training subjects, in the bundle's grid (their ground
    truth resampled as the training data are: RAS, ``pixdim``, padded / cropped to ``spatial_size``)."""
    import json

    import numpy as np
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, Spacing

    from brainsynth.cohort import subject_regions
    from brainsynth.data.reader import nifti_voxels, open_nifti
    from brainsynth.metrics.contrast import mean_ratios, print_ratio_table, ratio_table, region_ratios

    ratios = (("csf", "wm"), ("gm", "wm"))
    datalist_path = Path(dataset_dir) / "datalist.json"
    reference = json.loads(datalist_path.read_text())["training"][: int(n_reference)]

    def to_grid(mode: str) -> Compose:
        labels = [["L", "R"], ["P", "A"], ["I", "S"]]
        steps = [Orientation("RAS", labels=labels), Spacing(pixdim, mode=mode), ResizeWithPadOrCrop(spatial_size)]
        return Compose(steps)

    def load(path) -> MetaTensor:  # nibabel, not MONAI's reader chain (whose optional codecs warn on a CPU)
        image = open_nifti(path)
        return MetaTensor(torch.from_numpy(nifti_voxels(image, path, np.float32)[None]), affine=image.affine)

    votes: dict[str, np.ndarray] = {}
    real: dict[str, list] = {}
    for row in reference:
        first = datalist_path.parent / row[next(m for m in ("t1w", "t2w", "flair", "t1ce", "pd") if row.get(m))]
        affine = load(first).affine
        for name, mask in subject_regions(datalist_path, row["subject"], purity=0.5).items():
            if name in ("csf", "gm", "wm"):
                moved = to_grid("nearest")(MetaTensor(torch.from_numpy(mask[None].astype(np.float32)), affine=affine))
                votes[name] = votes.get(name, 0) + np.asarray(moved[0]) / len(reference)
    consensus = {name: v >= 0.5 for name, v in votes.items()}
    for row in reference:
        for modality in ("t1w", "t1ce", "t2w", "flair", "pd"):
            if row.get(modality):
                image = to_grid("bilinear")(load(datalist_path.parent / row[modality]))
                real.setdefault(modality, []).append(region_ratios(np.asarray(image[0]), consensus, ratios))
    generated: dict[str, list] = {}
    for row in rows:
        path = Path(output_dir) / f"{row['name']}.nii.gz"
        image = np.asarray(load(path)[0])
        if image.shape != tuple(int(s) for s in spatial_size):
            raise ValueError(f"{path}: shape {image.shape}, expected the bundle grid {tuple(spatial_size)}")
        generated.setdefault(row["modality"], []).append(region_ratios(image, consensus, ratios))
    gen = {m: mean_ratios(v) for m, v in generated.items()}
    ref = {m: mean_ratios(v) for m, v in real.items() if m in gen}
    table, agree = ratio_table(gen, ref)
    print_ratio_table(
        f"Mean intensity of a region over white matter per generated modality ({len(rows)} volumes, all "
        f"pathologies), real scans of {len(reference)} training subjects in brackets; regions: the cohort's "
        "consensus anatomy (CSF bright on T2w and PD, dark on T1w / T1ce / FLAIR):",
        table,
        agree,
    )
    return {"generated": gen, "real": ref, "agree": agree}

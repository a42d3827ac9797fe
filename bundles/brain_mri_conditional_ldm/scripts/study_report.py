"""The conditional LDM evidence study's report: the judge on real scans, the autoencoder's contrast fidelity, the
condition sensitivity over training, and, per guidance setting, whether generated scans show the requested
pathology and modality (seen and held-out combinations), how far they are from real ones and how diverse.

``python scripts/study_report.py RUN_DIR --config_file "[...]" --out RUN_DIR/study`` after the sampling steps of
``scripts/run_study.sh`` (which calls it). Reads ``RUN_DIR/eval/<setting>/metrics.json`` and the generated volumes
beside them, ``RUN_DIR/judge/feature_network.pt``, ``RUN_DIR/runs/diffusion/condition_sensitivity.jsonl``; writes
``study.json``, ``study.md`` and PNGs (matplotlib).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from brainsynth.engine.io import atomic_write_text
from brainsynth.engine.study import run_context

#: T1w and T1ce differ only where gadolinium enhances (the simulated cohort's acquisitions are otherwise the same,
#: FACTS.md section 6), so a scan without enhancing tissue cannot show which of the two it is
SAME_WITHOUT_CONTRAST = ("t1w", "t1ce")
GOALS = {"judge_modality": 0.98, "judge_pathology": 0.90, "seen_joint": 0.90, "held_out_joint": 0.90, "frechet": 1.5}
#: median intensity below which a generated volume counts as degenerate (real ones: about 0, the background)
DEGENERATE_MEDIAN = -0.1
NAME = re.compile(r"^(?P<pathology>[a-z]+)_(?P<modality>[a-z0-9]+)_(?P<sample>\d+)\.nii(\.gz)?$")


def merged_modality(name: str) -> str:
    return "t1w/t1ce" if name in SAME_WITHOUT_CONTRAST else name


def confusion(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> list[list[int]]:
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(truth, predicted):
        m[list(classes).index(t), list(classes).index(p)] += 1
    return m.tolist()


def accuracy(m: Sequence[Sequence[int]]) -> float:
    a = np.asarray(m)
    return float(np.trace(a) / max(a.sum(), 1))


def merged_accuracy(m: Sequence[Sequence[int]], classes: Sequence[str]) -> float:
    """Accuracy when T1w and T1ce count as one class."""
    a = np.asarray(m)
    hit = sum(
        a[i, j]
        for i, ci in enumerate(classes)
        for j, cj in enumerate(classes)
        if merged_modality(ci) == merged_modality(cj)
    )
    return float(hit / max(a.sum(), 1))


def generated_predictions(extractor, folder: Path) -> list[dict[str, Any]]:
    """Every generated volume under ``folder`` with what was asked and what the judge recognises."""
    from brainsynth.data.reader import read_nifti

    files = sorted(p for p in folder.iterdir() if NAME.match(p.name))
    if not files:
        raise FileNotFoundError(f"{folder}: no generated volumes named <pathology>_<modality>_<k>.nii.gz")
    volumes = np.stack([read_nifti(str(p), np.float32)[0] for p in files])
    predicted = extractor.classify(volumes)
    rows = []
    for i, p in enumerate(files):
        asked = NAME.match(p.name).groupdict()
        rows.append(
            {
                "file": p.name,
                "pathology": asked["pathology"],
                "modality": asked["modality"],
                "predicted_pathology": predicted["pathology"][i],
                "predicted_modality": predicted["modality"][i],
                # training images lie in [0, 1] with a black background: a negative median means the decoded
                # latent left the autoencoder's range (over-guided), whatever the judge makes of it
                "degenerate": bool(np.median(volumes[i]) < DEGENERATE_MEDIAN),
            }
        )
    return rows


def score(rows: Sequence[dict], held_out: set[tuple[str, str]], pathologies, modalities) -> dict[str, Any]:
    """Conditioning accuracy of generated scans, seen and held-out combinations apart, with confusion matrices."""
    out: dict[str, Any] = {}
    for group in ("seen", "held-out"):
        part = [r for r in rows if ((r["pathology"], r["modality"]) in held_out) == (group == "held-out")]
        if not part:
            continue
        mp = confusion([r["pathology"] for r in part], [r["predicted_pathology"] for r in part], pathologies)
        mm = confusion([r["modality"] for r in part], [r["predicted_modality"] for r in part], modalities)
        joint = [r["pathology"] == r["predicted_pathology"] and r["modality"] == r["predicted_modality"] for r in part]
        joint_merged = [
            r["pathology"] == r["predicted_pathology"]
            and merged_modality(r["modality"]) == merged_modality(r["predicted_modality"])
            for r in part
        ]
        out[group] = {
            "n": len(part),
            "degenerate": int(sum(bool(r.get("degenerate")) for r in part)),
            "degenerate_by_modality": {
                m: sum(bool(r.get("degenerate")) and r["modality"] == m for r in part) for m in modalities
            },
            "pathology_accuracy": accuracy(mp),
            "modality_accuracy": accuracy(mm),
            "modality_accuracy_t1_merged": merged_accuracy(mm, modalities),
            "joint_accuracy": float(np.mean(joint)),
            "joint_accuracy_t1_merged": float(np.mean(joint_merged)),
            "pathology_confusion": mp,
            "modality_confusion": mm,
        }
    return out


def distribution(metrics: dict, held_out: set[tuple[str, str]]) -> dict[str, Any]:
    """Frechet distance and diversity per combination group; held-out Frechet relative to the seen mean."""
    out: dict[str, Any] = {}
    for group in ("seen", "held-out"):
        rows = [c for c in metrics["combinations"] if c["split"] == group]
        fd = [c["feature_frechet_distance"] for c in rows if isinstance(c.get("feature_frechet_distance"), float)]
        div = [c["diversity_ms_ssim"] for c in rows if isinstance(c.get("diversity_ms_ssim"), float)]
        real = [c["real_diversity_ms_ssim"] for c in rows if isinstance(c.get("real_diversity_ms_ssim"), float)]
        out[group] = {
            "frechet_mean": float(np.mean(fd)) if fd else None,
            "frechet_sd": float(np.std(fd)) if fd else None,
            "ms_ssim_generated": float(np.mean(div)) if div else None,
            "ms_ssim_real": float(np.mean(real)) if real else None,
            "per_combination": {f"{c['pathology']}/{c['modality']}": c.get("feature_frechet_distance") for c in rows},
        }
    seen, held = out.get("seen", {}).get("frechet_mean"), out.get("held-out", {}).get("frechet_mean")
    out["held_out_frechet_over_seen"] = float(held / seen) if seen and held is not None else None
    return out


def contrast_fidelity(parser) -> dict[str, Any]:
    """The autoencoder's reconstruction of test scans: CSF / WM and GM / WM per modality, scan beside
    reconstruction, in each subject's own ground-truth regions (simulated cohort). If the reconstruction flattens
    a modality's contrast, no diffusion model on its latents can show it."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, Spacing

    from brainsynth.cohort import subject_regions
    from brainsynth.data import expand_scans, resolve_dataset_dir, split_items
    from brainsynth.engine.io import load_checkpoint
    from brainsynth.metrics.contrast import mean_ratios, region_ratios

    ae = parser.get_parsed_content("autoencoder")
    ae.load_state_dict(load_checkpoint(parser.get_parsed_content("autoencoder_path")))
    ae.eval()
    datalist = (
        Path(
            resolve_dataset_dir(
                parser.get_parsed_content("dataset_dir"),
                parser.get_parsed_content("cache_dir"),
                **parser.get_parsed_content("demo_cohort"),
            )
        )
        / "datalist.json"
    )
    pre = parser.get_parsed_content("real_preprocessing")
    pixdim, size = parser.get_parsed_content("pixdim"), parser.get_parsed_content("spatial_size")
    labels = [["L", "R"], ["P", "A"], ["I", "S"]]
    to_grid = Compose([Orientation("RAS", labels=labels), Spacing(pixdim, mode="nearest"), ResizeWithPadOrCrop(size)])
    subjects = split_items(parser.get_parsed_content("subjects"), "test")
    scans = expand_scans(subjects, parser.get_parsed_content("modalities"))
    from brainsynth.data.reader import open_nifti

    regions: dict[str, dict] = {}
    per: dict[str, dict[str, list]] = {}
    for scan in scans:
        if scan["subject"] not in regions:
            affine = open_nifti(str(scan["image"])).affine
            regions[scan["subject"]] = {
                k: np.asarray(to_grid(MetaTensor(torch.from_numpy(v[None].astype(np.float32)), affine=affine))[0]) > 0.5
                for k, v in subject_regions(datalist, scan["subject"], purity=0.5).items()
                if k in ("csf", "gm", "wm")
            }
        image = pre(dict(scan))["image"][None]
        with torch.no_grad():
            z_mu, _ = ae.encode(image)
            recon = ae.decode(z_mu)
        entry = per.setdefault(scan["modality"], {"real": [], "reconstruction": [], "mae": []})
        pairs = (("csf", "wm"), ("gm", "wm"))
        entry["real"].append(region_ratios(np.asarray(image[0, 0]), regions[scan["subject"]], pairs))
        entry["reconstruction"].append(region_ratios(np.asarray(recon[0, 0]), regions[scan["subject"]], pairs))
        entry["mae"].append(float((recon - image).abs().mean()))
    return {
        m: {"n": len(v["mae"]), "mae": float(np.mean(v["mae"])), "real": mean_ratios(v["real"]),
            "reconstruction": mean_ratios(v["reconstruction"])}
        for m, v in per.items()
    }  # fmt: skip


def _confusion_figure(path: Path, matrices: dict[str, tuple[list, Sequence[str]]], title: str) -> Path:
    from brainsynth.engine.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.2))
    for ax, (name, (m, classes)) in zip(np.atleast_1d(axes), matrices.items()):
        a = np.asarray(m, dtype=float)
        rows = a / np.maximum(a.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j, i, int(a[i, j]), ha="center", va="center", fontsize=8, color="k" if rows[i, j] < 0.6 else "w"
                )
        ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("recognised as")
        ax.set_ylabel("truth / requested")
        ax.set_title(f"{name}: {accuracy(m):.0%}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, overwrite=True)


def _grid_figure(path: Path, folder: Path, pathologies, modalities, held_out, title: str) -> Path:
    """One generated scan per cell (sample 0, axial slice through the centre), held-out cells framed in red."""
    from brainsynth.data.reader import read_nifti
    from brainsynth.engine.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(pathologies), len(modalities), figsize=(1.9 * len(modalities), 1.9 * len(pathologies)))
    for i, p in enumerate(pathologies):
        for j, m in enumerate(modalities):
            ax = axes[i, j]
            f = folder / f"{p}_{m}_000.nii.gz"
            if f.is_file():
                v = read_nifti(str(f), np.float32)[0]
                ax.imshow(np.rot90(v[:, :, v.shape[2] // 2]), cmap="gray", vmin=0, vmax=max(float(v.max()), 1e-6))
            ax.set_xticks([])
            ax.set_yticks([])
            if (p, m) in held_out:
                for side in ax.spines.values():
                    side.set_edgecolor("red")
                    side.set_linewidth(3)
            if i == 0:
                ax.set_title(m, fontsize=9)
            if j == 0:
                ax.set_ylabel(p, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, overwrite=True)


def main(run_dir: str, config_file: str, out: str | None = None, settings: Sequence[str] | None = None) -> None:
    import torch
    from monai.bundle import ConfigParser

    from brainsynth.engine.figures import curves
    from brainsynth.metrics.feature_network import load_feature_network

    torch.set_num_threads(1)
    run = Path(run_dir)
    out_dir = Path(out or run / "study")
    files = (
        ast.literal_eval(config_file) if isinstance(config_file, str) and config_file.startswith("[") else config_file
    )
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": str(run)})
    pathologies, modalities = parser.get_parsed_content("pathologies"), parser.get_parsed_content("modalities")
    held_out = {(str(p), str(m)) for p, m in parser.get_parsed_content("held_out_combinations")}
    judge = load_feature_network(run / "judge" / "feature_network.pt")
    report: dict[str, Any] = {
        "context": run_context(),
        "classes": {"pathology": list(pathologies), "modality": list(modalities)},
        "held_out_combinations": sorted(held_out),
    }
    v = judge.validation
    report["judge"] = {
        "name": judge.name,
        "n_scans": v.get("n_scans"),
        "pathology_accuracy": v.get("pathology_accuracy"),
        "modality_accuracy": v.get("modality_accuracy"),
        "modality_accuracy_t1_merged": merged_accuracy(v["modality_confusion"], modalities),
        "pathology_confusion": v.get("pathology_confusion"),
        "modality_confusion": v.get("modality_confusion"),
    }
    report["autoencoder_contrast_fidelity"] = contrast_fidelity(parser)
    log = run / "runs" / "diffusion" / "condition_sensitivity.jsonl"
    if log.is_file():
        from scripts.condition_sensitivity import read_log

        report["condition_sensitivity"] = read_log(log)
    names = (
        list(settings)
        if settings
        else sorted(p.name for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())
    )
    report["settings"] = {}
    for name in names:
        metrics = json.loads((run / "eval" / name / "metrics.json").read_text())
        rows = generated_predictions(judge, run / "eval" / name / "generated")
        report["settings"][name] = {
            "conditioning": score(rows, held_out, pathologies, modalities),
            "distribution": distribution(metrics, held_out),
            "per_combination": metrics["combinations"],
        }
    best = max(
        names, key=lambda n: report["settings"][n]["conditioning"].get("seen", {}).get("joint_accuracy_t1_merged", 0)
    )
    report["best_setting"] = best
    report["goals"] = goals(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    _confusion_figure(
        out_dir / "judge_confusion_real.png",
        {"pathology": (v["pathology_confusion"], pathologies), "modality": (v["modality_confusion"], modalities)},
        f"Judge on {v.get('n_scans')} held-out real scans (study cohort's validation + test subjects)",
    )
    for group in ("seen", "held-out"):
        c = report["settings"][best]["conditioning"].get(group)
        if c:
            _confusion_figure(
                out_dir / f"judge_confusion_generated_{group}.png",
                {
                    "pathology": (c["pathology_confusion"], pathologies),
                    "modality": (c["modality_confusion"], modalities),
                },
                f"Judge on {c['n']} generated scans of {group} combinations ({best})",
            )
    _grid_figure(
        out_dir / "generated_grid.png",
        run / "eval" / best / "generated",
        pathologies,
        modalities,
        held_out,
        f"Generated scans, sample 0 of each combination ({best}); red frame: held out of both training stages",
    )
    if report.get("condition_sensitivity"):
        rows = report["condition_sensitivity"]
        t = "500" if "500" in rows[0]["timesteps"] else next(iter(rows[0]["timesteps"]))
        curves(
            out_dir / "condition_sensitivity.png",
            {
                k.replace("_", " "): ([r["iteration"] for r in rows], [100 * r["timesteps"][t][k] for r in rows])
                for k in ("conditioned_vs_null", "between_pathologies", "between_modalities")
            },
            "stage-2 iteration",
            "% of the predicted noise's norm",
            f"How much the EMA U-Net's prediction changes with its conditions (t = {t})",
            overwrite=True,
        )
    atomic_write_text(out_dir / "study.json", json.dumps(report, indent=2), overwrite=True)
    atomic_write_text(out_dir / "study.md", markdown(report), overwrite=True)
    print(markdown(report))


def goals(report: dict) -> dict[str, Any]:
    j = report["judge"]
    best = report["settings"][report["best_setting"]]
    seen, held = best["conditioning"].get("seen", {}), best["conditioning"].get("held-out", {})
    ratio = best["distribution"].get("held_out_frechet_over_seen")
    seen_joint, held_joint = seen.get("joint_accuracy"), held.get("joint_accuracy")
    judge_m, judge_p = j["modality_accuracy"], j["pathology_accuracy"]
    return {
        "judge modality >= 98 % on real": (judge_m, judge_m >= GOALS["judge_modality"]),
        "judge pathology >= 90 % on real": (judge_p, judge_p >= GOALS["judge_pathology"]),
        "seen combinations: both recognised >= 90 %": (seen_joint, (seen_joint or 0) >= GOALS["seen_joint"]),
        "held-out combinations: both recognised >= 90 %": (held_joint, (held_joint or 0) >= GOALS["held_out_joint"]),
        "held-out Frechet <= 1.5 x seen mean": (ratio, ratio is not None and ratio <= GOALS["frechet"]),
    }


def _f(x: Any, pct: bool = False) -> str:
    if not isinstance(x, (int, float)) or x is None or not np.isfinite(x):
        return "-"
    return f"{100 * x:.0f} %" if pct else f"{x:.2f}"


def _matrix_md(m: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    lines = ["| truth \\ recognised | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    lines += [f"| {c} | " + " | ".join(str(x) for x in row) + " |" for c, row in zip(classes, m)]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    ctx, j = report["context"], report["judge"]
    pathologies, modalities = report["classes"]["pathology"], report["classes"]["modality"]
    out = [
        "# Conditional LDM evidence study",
        "",
        f"Command: `{ctx['command']}`  ",
        f"Commit {ctx['commit']}, {ctx['date']}, {ctx['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items()),
        "",
        "Held out of both training stages: " + ", ".join(f"{p} / {m}" for p, m in report["held_out_combinations"]),
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    out += [
        f"| {k} | {_f(v, pct='Frechet' not in k)} | {'yes' if ok else 'no'} |" for k, (v, ok) in report["goals"].items()
    ]
    out += [
        "",
        f"## The judge ({j['name']}) on {j['n_scans']} held-out real scans",
        "",
        f"Pathology {_f(j['pathology_accuracy'], True)}, modality {_f(j['modality_accuracy'], True)} "
        f"(T1w and T1ce counted as one: {_f(j['modality_accuracy_t1_merged'], True)}).",
        "",
        _matrix_md(j["pathology_confusion"], pathologies),
        "",
        _matrix_md(j["modality_confusion"], modalities),
        "",
        "## Autoencoder contrast fidelity (test scans; subject's own regions)",
        "",
        "| modality | n | mean absolute error | CSF / WM real | CSF / WM reconstruction | GM / WM real "
        "| GM / WM reconstruction |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, f in report["autoencoder_contrast_fidelity"].items():
        out.append(
            f"| {m} | {f['n']} | {f['mae']:.4f} | {_f(f['real'].get('csf/wm'))} "
            f"| {_f(f['reconstruction'].get('csf/wm'))} "
            f"| {_f(f['real'].get('gm/wm'))} | {_f(f['reconstruction'].get('gm/wm'))} |"
        )
    if report.get("condition_sensitivity"):
        out += ["", "## Condition sensitivity during stage 2 (t = 500, % of the predicted noise's norm)", ""]
        out += ["| iteration | conditioned vs null | between pathologies | between modalities |", "|---|---|---|---|"]
        for r in report["condition_sensitivity"]:
            s = r["timesteps"].get("500") or next(iter(r["timesteps"].values()))
            out.append(
                f"| {r['iteration']} | {100 * s['conditioned_vs_null']:.2f} | {100 * s['between_pathologies']:.2f} "
                f"| {100 * s['between_modalities']:.2f} |"
            )
    out += [
        "",
        "## Generated scans, per guidance setting",
        "",
        "Recognised = the judge's answer equals the request. 'T1 merged': T1w and T1ce counted as one modality. "
        f"Degenerate: volumes whose median intensity is below {DEGENERATE_MEDIAN} (the decoded latent left the "
        "autoencoder's range; they are black in the grid figure and still counted in every column).",
        "",
        "| setting | combinations | n | degenerate | pathology | modality | modality (T1 merged) | both "
        "| both (T1 merged) | Frechet distance (judge features) | MS-SSIM generated | MS-SSIM real |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["settings"].items():
        for group in ("seen", "held-out"):
            c, d = s["conditioning"].get(group), s["distribution"].get(group, {})
            if not c:
                continue
            out.append(
                f"| {name} | {group} | {c['n']} | {c['degenerate']} | {_f(c['pathology_accuracy'], True)} "
                f"| {_f(c['modality_accuracy'], True)} "
                f"| {_f(c['modality_accuracy_t1_merged'], True)} | {_f(c['joint_accuracy'], True)} "
                f"| {_f(c['joint_accuracy_t1_merged'], True)} "
                f"| {_f(d.get('frechet_mean'))} +- {_f(d.get('frechet_sd'))} "
                f"| {_f(d.get('ms_ssim_generated'))} | {_f(d.get('ms_ssim_real'))} |"
            )
        out.append(
            f"| {name} | held-out Frechet / seen | | | | | | | "
            f"| {_f(s['distribution'].get('held_out_frechet_over_seen'))} | | |"
        )
    best = report["best_setting"]
    out += ["", f"Best setting by seen-combination accuracy (T1 merged): **{best}**.", ""]
    for group in ("seen", "held-out"):
        c = report["settings"][best]["conditioning"].get(group)
        if c:
            out += [
                f"Judge on generated scans of {group} combinations ({best}), modality:",
                "",
                _matrix_md(c["modality_confusion"], modalities),
                "",
            ]
            out += ["pathology:", "", _matrix_md(c["pathology_confusion"], pathologies), ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import fire

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `scripts` importable when run from anywhere
    fire.Fire(main)

"""The D3M seed study's report (scripts/run_seed_study.py): methods over training seeds, deformation on vs off.

``python scripts/seed_study_report.py RESULTS [--out RESULTS/study]`` reads ``RESULTS/seed<S>/<unit>/`` (per-slice
tables, ``diagnostics_<variant>.jsonl``, ``unit.json``) and writes ``study.json``, ``study.md`` and two PNGs:

- each method's PSNR / SSIM (whole slice, tumour) as the mean +- sd over seeds of the per-seed slice means;
- the paper's order (d3m > no_mssdm) and the working deformation's (x0_deformer > no_mssdm) tested across seeds on
  per-seed means (paired t-test and sign count); slice-level Wilcoxon tests only within a seed;
- deformation on vs off for the same trained model, paired per slice, per seed;
- the field inside the enhancing tumour (mean |u| in px, validation slices, fixed noise) over training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brainsynth.deformation.diagnostics import read_diagnostics
from brainsynth.engine.io import atomic_write_text
from brainsynth.engine.study import report_main, run_context
from brainsynth.metrics.paired import METRICS, read_csv, wilcoxon_signed_rank

METHODS = ("d3m", "x0_deformer", "no_mssdm", "d3m_warp_off", "x0_deformer_warp_off")
#: (better, worse) claims tested across seeds
CLAIMS = (("d3m", "no_mssdm"), ("x0_deformer", "no_mssdm"), ("x0_deformer", "d3m"))
#: the same trained model sampled with and without its deformation
WARP_PAIRS = (("d3m", "d3m_warp_off"), ("x0_deformer", "x0_deformer_warp_off"))
DEFORMING = ("d3m", "x0_deformer")
LABELS = {
    "psnr_whole": "whole PSNR (dB)",
    "ssim_whole": "whole SSIM (%)",
    "psnr_region": "tumour PSNR (dB)",
    "ssim_region": "tumour SSIM (%)",
}


def _scale(metric: str, values):
    return 100.0 * np.asarray(values, float) if metric.startswith("ssim") else np.asarray(values, float)


def load(results: Path) -> tuple[dict[int, dict[str, list[dict]]], dict[int, dict[str, dict]], list[dict]]:
    """({seed: {method: per-slice rows}}, {seed: {variant: diagnostics}}, unit records) of every unit with tables;
    a unit without ``unit.json`` (still running) is recorded as partial."""
    tables: dict[int, dict[str, list[dict]]] = {}
    diagnostics: dict[int, dict[str, dict]] = {}
    units = []
    for folder in sorted(p for p in results.glob("seed*/*") if p.is_dir()):
        seed = int(folder.parent.name.removeprefix("seed"))
        record_path = folder / "unit.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {"seed": seed, "unit": folder.name}
        record["partial"] = not record_path.exists()
        methods = [p.name.removesuffix("_per_slice.csv") for p in sorted(folder.glob("*_per_slice.csv"))]
        if not methods:
            continue
        units.append(record)
        for method in methods:
            tables.setdefault(seed, {})[method] = read_csv(folder / f"{method}_per_slice.csv")
        for path in folder.glob("diagnostics_*.jsonl"):
            diagnostics.setdefault(seed, {})[path.stem.removeprefix("diagnostics_")] = read_diagnostics(path)
    return tables, diagnostics, units


def _paired(a_rows: list[dict], b_rows: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    b = {(r["subject"], r["slice"]): r[metric] for r in b_rows}
    pairs = [
        (float(r[metric]), float(b[(r["subject"], r["slice"])])) for r in a_rows if (r["subject"], r["slice"]) in b
    ]
    arr = np.asarray(pairs, float).reshape(-1, 2)
    return _scale(metric, arr[:, 0]), _scale(metric, arr[:, 1])


def seed_means(tables) -> dict[str, dict[str, dict[int, float]]]:
    """{method: {metric: {seed: mean over slices}}}."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for seed, methods in tables.items():
        for method, rows in methods.items():
            for m in METRICS:
                values = _scale(m, [float(r[m]) for r in rows])
                out.setdefault(method, {}).setdefault(m, {})[seed] = float(np.nanmean(values))
    return out


def across_seeds(means, better: str, worse: str) -> dict:
    """Per-seed means of ``better`` minus ``worse`` (seeds both have): mean, sd, seeds where better wins, paired
    t-test p (NaN under 2 seeds)."""
    from scipy.stats import ttest_rel

    out = {"better": better, "worse": worse}
    for m in METRICS:
        seeds = sorted(set(means.get(better, {}).get(m, {})) & set(means.get(worse, {}).get(m, {})))
        a = np.asarray([means[better][m][s] for s in seeds])
        b = np.asarray([means[worse][m][s] for s in seeds])
        diff = a - b
        p = float(ttest_rel(a, b).pvalue) if len(seeds) >= 2 and np.ptp(diff) > 0 else float("nan")
        out[m] = {
            "seeds": seeds,
            "per_seed_difference": diff.tolist(),
            "mean_difference": float(diff.mean()) if seeds else float("nan"),
            "sd_difference": float(diff.std(ddof=1)) if len(seeds) > 1 else float("nan"),
            "wins": int((diff > 0).sum()),
            "t_test_p": p,
        }
    return out


def within_seed(tables, a: str, b: str) -> dict[int, dict]:
    """Per seed, ``a`` vs ``b`` paired per slice: mean difference, largest |difference|, Wilcoxon p."""
    out = {}
    for seed, methods in sorted(tables.items()):
        if a not in methods or b not in methods:
            continue
        entry = {}
        for m in ("psnr_region", "ssim_region", "psnr_whole", "ssim_whole"):
            x, y = _paired(methods[a], methods[b], m)
            keep = np.isfinite(x) & np.isfinite(y)
            test = wilcoxon_signed_rank(x[keep], y[keep])
            entry[m] = {
                "n": int(keep.sum()),
                "mean_difference": float((x - y)[keep].mean()),
                "max_abs_difference": float(np.abs(x - y)[keep].max()),
                "p": float(test["p_value"]),
            }
        out[seed] = entry
    return out


def field_history(diagnostics) -> dict[str, dict[int, dict[str, list]]]:
    """{variant: {seed: {"iterations": [...], "t<t>": [mean |u| in the tumour, px]}}}."""
    out: dict[str, dict[int, dict[str, list]]] = {}
    for seed, variants in sorted(diagnostics.items()):
        for variant, history in variants.items():
            if variant not in DEFORMING:
                continue
            its = sorted(history)
            entry: dict[str, list] = {"iterations": its}
            for t in history[its[-1]]:
                entry[f"t{t}"] = [history[i].get(t, {}).get("field_tumour_mean_px", float("nan")) for i in its]
            out.setdefault(variant, {})[seed] = entry
    return out


def _p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else ("< 0.001" if p < 1e-3 else f"{p:.3f}")


def markdown(result: dict) -> str:
    lines = [
        f"# D3M seed study\n\nCommand: `{result['context']['command']}`; commit {result['context']['commit']}; "
        f"{result['context']['machine']}. Seeds with results: {result['seeds']}. Units: "
        + ", ".join(f"seed {u['seed']} {u['unit']}" + (" (partial)" if u["partial"] else "") for u in result["units"])
        + ".\n",
        "## Per method: mean +- sd over training seeds of the per-seed slice means\n",
        "| method | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for method, s in result["summary"].items():
        cells = [f"{s[m]['mean']:.2f} +- {s[m]['sd']:.2f}" for m in METRICS]
        lines.append(f"| {method} | {s['seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "\n## Claims across seeds (per-seed means; paired t-test)\n",
        "| claim | metric | per-seed differences | mean +- sd | wins | p |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["across_seeds"]:
        for m in ("psnr_region", "ssim_region"):
            d = c[m]
            diffs = ", ".join(f"{x:+.2f}" for x in d["per_seed_difference"])
            lines.append(
                f"| {c['better']} > {c['worse']} | {LABELS[m]} | {diffs} | {d['mean_difference']:+.2f} +- "
                f"{d['sd_difference']:.2f} | {d['wins']}/{len(d['seeds'])} | {_p(d['t_test_p'])} |"
            )
    lines += [
        "\n## Deformation on vs off, same trained model, paired per slice (tumour)\n",
        "| model | seed | n | PSNR on - off (dB), max abs | SSIM on - off (points), max abs | p (SSIM) |",
        "|---|---|---|---|---|---|",
    ]
    for pair, per_seed in result["warp_on_off"].items():
        for seed, e in per_seed.items():
            ps, ss = e["psnr_region"], e["ssim_region"]
            lines.append(
                f"| {pair} | {seed} | {ss['n']} | {ps['mean_difference']:+.3f}, {ps['max_abs_difference']:.3f} "
                f"| {ss['mean_difference']:+.3f}, {ss['max_abs_difference']:.3f} | {_p(ss['p'])} |"
            )
    lines += [
        "\n## Field inside the enhancing tumour at the end of training (mean |u|, px)\n",
        "| variant | seed | last iteration | " + " | ".join(result["field_timesteps"]) + " |",
        "|---|---|---|" + "---|" * len(result["field_timesteps"]),
    ]
    for variant, per_seed in result["field_in_tumour"].items():
        for seed, e in per_seed.items():
            cells = [f"{e[t][-1]:.3f}" if t in e else "" for t in result["field_timesteps"]]
            lines.append(f"| {variant} | {seed} | {e['iterations'][-1]} | " + " | ".join(cells) + " |")
    lines += [
        "\n## Slice-level tests within each seed (tumour SSIM, points)\n",
        "| claim | seed | n | mean diff | p |",
        "|---|---|---|---|---|",
    ]
    for claim, per_seed in result["within_seed"].items():
        for seed, e in per_seed.items():
            s = e["ssim_region"]
            lines.append(f"| {claim} | {seed} | {s['n']} | {s['mean_difference']:+.2f} | {_p(s['p'])} |")
    return "\n".join(lines) + "\n"


def figures(result: dict, means, out: Path, overwrite: bool) -> None:
    from brainsynth.engine.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, variant in zip(axes, DEFORMING):
        for seed, e in result["field_in_tumour"].get(variant, {}).items():
            for t, style in (("t250", "-"), ("t500", "--")):
                if t in e:
                    ax.plot(e["iterations"], e[t], style, label=f"seed {seed}, {t}")
        ax.set(title=f"{variant}: field inside the tumour", xlabel="training iteration", ylabel="mean |u| (px)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out / "field_in_tumour.png", overwrite)
    methods = [m for m in ("no_mssdm", "d3m", "x0_deformer") if m in means]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("psnr_region", "ssim_region")):
        seeds = sorted({s for m in methods for s in means[m][metric]})
        for seed in seeds:
            xs = [i for i, m in enumerate(methods) if seed in means[m][metric]]
            ax.plot(xs, [means[methods[i]][metric][seed] for i in xs], "o-", alpha=0.7, label=f"seed {seed}")
        ax.set_xticks(range(len(methods)), methods)
        ax.set(ylabel=LABELS[metric], title="per-seed means (lines join one seed)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, out / "tumour_metrics_per_seed.png", overwrite)


def write_report(results: Path, out: Path, overwrite: bool = False) -> dict:
    tables, diagnostics, units = load(results)
    if not tables:
        raise SystemExit(f"{results}: no unit has tables yet (seed*/*/*_per_slice.csv); run scripts/run_seed_study.py")
    if out.exists() and (out / "study.json").exists() and not overwrite:
        raise SystemExit(f"{out}/study.json exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    means = seed_means(tables)
    summary = {}
    for method in [m for m in METHODS if m in means]:
        summary[method] = {"seeds": sorted(means[method]["ssim_region"])}
        for m in METRICS:
            v = np.asarray([means[method][m][s] for s in summary[method]["seeds"]])
            summary[method][m] = {
                "mean": float(v.mean()),
                "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                "per_seed": v.tolist(),
            }
    fields = field_history(diagnostics)
    timesteps = sorted(
        {k for v in fields.values() for e in v.values() for k in e if k.startswith("t")}, key=lambda k: int(k[1:])
    )
    result = {
        "context": run_context(),
        "seeds": sorted(tables),
        "units": units,
        "summary": summary,
        "across_seeds": [across_seeds(means, a, b) for a, b in CLAIMS],
        "warp_on_off": {f"{a} vs {b}": within_seed(tables, a, b) for a, b in WARP_PAIRS},
        "within_seed": {f"{a} > {b}": within_seed(tables, a, b) for a, b in CLAIMS},
        "field_in_tumour": fields,
        "field_timesteps": timesteps,
    }
    atomic_write_text(out / "study.json", json.dumps(result, indent=1, default=float), overwrite)
    atomic_write_text(out / "study.md", markdown(result), overwrite)
    figures(result, means, out, overwrite)
    return result


def main() -> None:
    report_main(write_report, markdown, __doc__.split("\n")[0], "results")


if __name__ == "__main__":
    main()

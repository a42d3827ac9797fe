"""The D3M evidence study's report: ordered paired comparisons, the deformation diagnostics' verdict, figures.

``python scripts/study_report.py RUN_DIR --out RUN_DIR/study`` after ``scripts/run_study.sh`` (which calls it). Reads
``RUN_DIR/eval/<method>_per_{slice,volume}.csv`` and ``_examples.npz`` and ``RUN_DIR/runs/<variant>/tensorboard/
diagnostics.jsonl``; writes ``study.json``, ``study.md`` and PNGs (matplotlib).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brainsynth.deformation.diagnostics import read_diagnostics
from brainsynth.engine.io import atomic_write_text
from brainsynth.engine.study import report_main, run_context
from brainsynth.metrics.paired import METRICS, compare_methods, read_csv

VARIANTS = ("d3m", "no_mssdm", "no_dsimd", "palette")
#: the paper's claimed order, each step tested on paired units
ORDER = (("d3m", "no_mssdm"), ("no_mssdm", "no_dsimd"), ("no_dsimd", "palette"))
#: the same trained D3M model sampled differently (deformation off / only at low noise) against full D3M sampling
SAMPLING = (("d3m", "d3m_warp_off"), ("d3m_warp_t250", "d3m"), ("d3m_warp_t500", "d3m"))
LABELS = {"psnr_whole": "whole PSNR (dB)", "ssim_whole": "whole SSIM (%)",
          "psnr_region": "tumour PSNR (dB)", "ssim_region": "tumour SSIM (%)"}  # fmt: skip


def _rows(eval_dir: Path, method: str, unit: str) -> list[dict]:
    return read_csv(eval_dir / f"{method}_per_{unit}.csv")


def _scale(metric: str, value: float) -> float:
    return 100.0 * value if metric.startswith("ssim") else value


def pair_test(eval_dir: Path, better: str, worse: str, unit: str) -> dict:
    """Paired Wilcoxon of ``better`` against ``worse`` on every metric (units: slices or subjects)."""
    key = ("subject", "slice") if unit == "slice" else ("subject",)
    summary = compare_methods(_rows(eval_dir, better, unit) + _rows(eval_dir, worse, unit), better, key=key)
    a, b = summary[0], summary[1]
    out = {"better": better, "worse": worse, "unit": unit, "n": a["units"]}
    for m in METRICS:
        out[m] = {"difference": _scale(m, a[f"{m}_mean"] - b[f"{m}_mean"]), "p": b[f"{m}_p"],
                  "holds": bool(a[f"{m}_mean"] > b[f"{m}_mean"])}  # fmt: skip
    return out


def summaries(eval_dir: Path, methods: list[str], unit: str) -> dict[str, dict]:
    key = ("subject", "slice") if unit == "slice" else ("subject",)
    rows = [r for m in methods for r in _rows(eval_dir, m, unit)]
    return {
        s["method"]: {m: (_scale(m, s[f"{m}_mean"]), _scale(m, s[f"{m}_sd"])) for m in METRICS}
        for s in compare_methods(rows, methods[0], key=key)
    }


def _p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else ("< 0.001" if p < 1e-3 else f"{p:.3f}")


def write_report(run_dir: Path, out: Path, overwrite: bool = False) -> dict:
    eval_dir = run_dir / "eval"
    methods = [m for m in (*VARIANTS, "d3m_warp_off", "d3m_warp_t250", "d3m_warp_t500")
               if (eval_dir / f"{m}_per_slice.csv").is_file()]  # fmt: skip
    missing = [v for v in VARIANTS if v not in methods]
    if missing:
        raise FileNotFoundError(f"{eval_dir}: no evaluation of {', '.join(missing)}; run scripts/run_study.sh first")
    result = {"context": run_context(), "run_dir": str(run_dir), "methods": methods, "summary": {}, "order": [],
              "sampling": [], "diagnostics": {}}  # fmt: skip
    for unit in ("slice", "volume"):
        result["summary"][unit] = summaries(eval_dir, methods, unit)
        result["order"] += [pair_test(eval_dir, a, b, unit) for a, b in ORDER]
        result["sampling"] += [pair_test(eval_dir, a, b, unit) for a, b in SAMPLING if a in methods and b in methods]
    for variant in VARIANTS:
        path = run_dir / "runs" / variant / "tensorboard" / "diagnostics.jsonl"
        if path.is_file():
            result["diagnostics"][variant] = read_diagnostics(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(result, indent=1), overwrite=overwrite)
    atomic_write_text(out / "study.md", markdown(result), overwrite=overwrite)
    figures(result, eval_dir, out, overwrite)
    return result


def markdown(result: dict) -> str:
    lines = []
    for unit in ("slice", "volume"):
        s = result["summary"][unit]
        n = next(t["n"] for t in result["order"] if t["unit"] == unit)
        lines += [f"Per {unit} (n = {n}), mean +- sd:", "", _header("method")]
        for method, values in s.items():
            lines.append(
                f"| {method} | " + " | ".join(f"{values[m][0]:.2f} +- {values[m][1]:.2f}" for m in METRICS) + " |"
            )
        lines += ["", f"Paired two-sided Wilcoxon per {unit}: difference of means (first - second) and p; "
                  "'yes' where the first is better as the paper claims.", "", _header("comparison")]  # fmt: skip
        for t in [t for t in result["order"] + result["sampling"] if t["unit"] == unit]:
            cells = [
                f"{t[m]['difference']:+.2f}, p {_p(t[m]['p'])} ({'yes' if t[m]['holds'] else 'no'})" for m in METRICS
            ]
            lines.append(f"| {t['better']} > {t['worse']} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["diagnostics"]:
        lines += ["Mask-estimate diagnostics at the end of training (held-out validation slices, fixed noise): Dice "
                  "of the thresholded x0 mask, in brackets the noisy input's own mask Dice (no skill), and D3M's "
                  "mean field magnitude (pixels).", "",
                  "| variant | iteration | " + " | ".join(f"t={t}" for t in _timesteps(result)) + " |",
                  "|---|---|" + "---|" * len(_timesteps(result))]  # fmt: skip
        for variant, diag in result["diagnostics"].items():
            last = max(diag)
            cells = []
            for t in _timesteps(result):
                e = diag[last][t]
                cell = f"{e['mask_dice']:.3f} [{e['noisy_mask_dice']:.3f}]"
                if "field_mean_px" in e:
                    cell += f", field {e['field_mean_px']:.3f} px"
                cells.append(cell)
            lines.append(f"| {variant} | {last} | " + " | ".join(cells) + " |")
        lines.append("")
    c = result["context"]
    lines.append(f"Command: `{c['command']}`; commit {c['commit']}; {c['machine']}; {c['date']}.")
    return "\n".join(lines) + "\n"


def _header(first: str) -> str:
    return f"| {first} | " + " | ".join(LABELS[m] for m in METRICS) + " |\n" + "|---" * (len(METRICS) + 1) + "|"


def _timesteps(result: dict) -> list[str]:
    diag = next(iter(result["diagnostics"].values()))
    return sorted(diag[max(diag)], key=int)


def figures(result: dict, eval_dir: Path, out: Path, overwrite: bool) -> None:
    from brainsynth.engine import figures as fig

    s = result["summary"]["slice"]
    for metric in ("psnr_region", "ssim_region"):
        fig.bar_chart(
            out / f"{metric}.png",
            {m: {LABELS[metric]: s[m][metric]} for m in s},
            LABELS[metric],
            f"{LABELS[metric]} per method, mean +- sd over held-out tumour slices",
            overwrite=overwrite,
        )
    if result["diagnostics"]:
        dice = {f"{v} t={t}": (list(d), [d[i][t]["mask_dice"] for i in d])
                for v, d in result["diagnostics"].items() for t in _timesteps(result)}  # fmt: skip
        fig.curves(out / "mask_estimate_dice.png", dice, "iteration", "Dice of the x0 mask estimate",
                   "Mask-estimate quality over training (validation slices)", overwrite=overwrite)  # fmt: skip
        if "d3m" in result["diagnostics"]:
            d = result["diagnostics"]["d3m"]
            field = {f"t={t}": (list(d), [d[i][t].get("field_mean_px", np.nan) for i in d]) for t in _timesteps(result)}
            fig.curves(out / "field_magnitude.png", field, "iteration", "mean |displacement| (pixels)",
                       "D3M deformation field over training", overwrite=overwrite)  # fmt: skip
    examples(eval_dir, result["methods"], out / "examples.png", overwrite)


def examples(eval_dir: Path, methods: list[str], path: Path, overwrite: bool) -> None:
    """One tumour slice (the largest region in the first evaluated subject): real T1ce, then per method the
    synthetic slice and its absolute error inside the tumour."""
    from brainsynth.engine.figures import pyplot, save_figure

    data = {m: np.load(eval_dir / f"{m}_examples.npz") for m in methods if (eval_dir / f"{m}_examples.npz").is_file()}
    if not data:
        return
    first = data[methods[0]]
    subject = sorted(k.split("/")[0] for k in first.files)[0]
    region = first[f"{subject}/region"]
    k = int(region.reshape(region.shape[0], -1).sum(1).argmax())
    real, reg = first[f"{subject}/real"][k], region[k] > 0.5
    plt = pyplot()
    f, axes = plt.subplots(2, len(data) + 1, figsize=(2.0 * (len(data) + 1), 4.2))
    axes[0, 0].imshow(np.rot90(real), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("real T1ce", fontsize=8)
    axes[1, 0].imshow(np.rot90(reg), cmap="gray")
    axes[1, 0].set_title("tumour region", fontsize=8)
    for j, (m, d) in enumerate(data.items(), start=1):
        syn = d[f"{subject}/synthetic"][k]
        err = np.abs(syn - real) * reg
        axes[0, j].imshow(np.rot90(syn), cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(m, fontsize=8)
        axes[1, j].imshow(np.rot90(err), cmap="magma", vmin=0, vmax=0.5)
        axes[1, j].set_title(f"|error| in tumour, mean {err[reg].mean():.3f}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    f.suptitle(f"subject {subject}, slice {int(first[f'{subject}/slices'][k])}", fontsize=9)
    save_figure(f, path, overwrite)


def main() -> None:
    report_main(write_report, markdown, __doc__.split("\n")[0], "run_dir")


if __name__ == "__main__":
    main()

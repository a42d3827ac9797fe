"""Evidence-study runs side by side: Dice per arm, arm differences against the spread between generator runs,
image quality and the memorisation audit, from each run's ``downstream.json`` and image-quality ``metrics.json``.

Usage (from the bundle folder):

    python scripts/compare_study_runs.py OUT LABEL=FOLDER [LABEL=FOLDER ...] [--overwrite]

A FOLDER holds ``downstream.json`` and ``image_quality.json`` (a committed result) or is a run folder of
``scripts/run_study.sh`` (``eval/downstream/downstream.json``, ``eval_ancestral/metrics.json``). Writes
``OUT/runs_compared.md`` and ``.json``. An arm difference is called an effect only where it is larger than the
spread of that arm's Dice between the runs of the same code (each generator run is one training seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainsynth.engine.io import atomic_write_text

COMPARISONS = (("synthetic", "real"), ("real + synthetic", "real"), ("8 real + synthetic", "8 real"))


def load_run(folder: Path) -> dict:
    """The downstream and image-quality records of a run folder or of a committed result folder."""
    for downstream, quality in (
        ("downstream.json", "image_quality.json"),
        ("eval/downstream/downstream.json", "eval_ancestral/metrics.json"),
    ):
        if (folder / downstream).is_file():
            record = {"downstream": json.loads((folder / downstream).read_text())}
            if (folder / quality).is_file():
                record["quality"] = json.loads((folder / quality).read_text())
            return record
    raise SystemExit(f"error: {folder} has no downstream.json (nor eval/downstream/downstream.json); give a "
                     "committed study result or a scripts/run_study.sh run folder")  # fmt: skip


def summarise(label: str, run: dict) -> dict:
    down = run["downstream"]
    arms = {name: arm["dice_mean"] for name, arm in down["arms"].items()}
    memo = down["memorisation"]
    groups = {name: g["summary"] for name, g in memo["groups"].items()}
    quality = {
        modality: {"ms_ssim": m["ms_ssim"]["mean"], "mse": m["mse"]["mean"]}
        for modality, m in run.get("quality", {}).get("modalities", {}).items()
    }
    return {
        "label": label,
        "commit": down["context"]["commit"],
        "command": down["context"]["command"],
        "date": down["context"]["date"],
        "seed": down.get("generator_seed", down.get("sampler_seed")),
        "dice": arms,
        "differences": {f"{a} - {b}": arms[a] - arms[b] for a, b in COMPARISONS if a in arms and b in arms},
        "memorisation": {
            "ceiling": memo["ceiling"],
            "above_ceiling": len(memo["above_ceiling"]),
            "groups": {name: {"mean": s["mean"], "max": s["max"], "n": s["n"]} for name, s in groups.items()},
        },
        "ms_ssim": {modality: q["ms_ssim"] for modality, q in quality.items()},
    }


def spread(runs: list[dict]) -> dict:
    """Per arm and per difference: the range over ``runs`` (the same code, other generator seeds)."""
    if len(runs) < 2:
        return {}
    out = {}
    for key in ("dice", "differences"):
        for name in runs[0][key]:
            values = [r[key][name] for r in runs if name in r[key]]
            out[f"{key}: {name}"] = {"mean": float(np.mean(values)), "range": float(np.ptp(values)), "n": len(values)}
    return out


def markdown(summaries: list[dict], same_code: list[dict], spreads: dict) -> str:
    labels = [s["label"] for s in summaries]
    head = "| | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    lines = ["# Med-DDPM evidence study: runs compared", ""]
    lines += [f"- **{s['label']}**: commit {s['commit']}, {s['date']}, seed {s['seed']}: `{s['command']}`"
              for s in summaries]  # fmt: skip
    lines += ["", "## Whole-tumour Dice on the 12 held-out real subjects (mean over 3 segmenter seeds)", ""]
    lines.append(head.rstrip())
    for arm in summaries[0]["dice"]:
        lines.append(f"| {arm} | " + " | ".join(f"{s['dice'].get(arm, float('nan')):.4f}" for s in summaries) + " |")
    lines += ["", "## Arm differences (Dice)", "", head.rstrip()]
    for name in summaries[0]["differences"]:
        row = " | ".join(f"{s['differences'].get(name, float('nan')):+.4f}" for s in summaries)
        lines.append(f"| {name} | {row} |")
    if spreads:
        lines += ["", f"## Spread between generator runs of the same code ({', '.join(s['label'] for s in same_code)})",
                  "", "| quantity | mean | range between runs |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['mean']:.4f} | {v['range']:.4f} |" for k, v in spreads.items()]
    lines += ["", "## Memorisation (correlation inside the training subject's brain)", "", head.rstrip()]
    lines.append("| real ceiling | " + " | ".join(f"{s['memorisation']['ceiling']:.4f}" for s in summaries) + " |")
    for group in summaries[0]["memorisation"]["groups"]:
        cells = []
        for s in summaries:
            g = s["memorisation"]["groups"].get(group)
            cells.append(f"{g['mean']:.4f} (max {g['max']:.4f})" if g else "-")
        lines.append(f"| {group}: mean (max) | " + " | ".join(cells) + " |")
    lines.append("| volumes above the ceiling | " + " | ".join(
        str(s["memorisation"]["above_ceiling"]) for s in summaries) + " |")  # fmt: skip
    if any(s["ms_ssim"] for s in summaries):
        lines += ["", "## Image quality: MS-SSIM against the real test scans (250-step ancestral)", "", head.rstrip()]
        for modality in summaries[0]["ms_ssim"]:
            cells = " | ".join(f"{s['ms_ssim'].get(modality, float('nan')):.4f}" for s in summaries)
            lines.append(f"| {modality} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", help="LABEL=FOLDER, oldest first")
    parser.add_argument("--same_code", nargs="*", default=None, help="labels of runs of the same code with other "
                        "generator seeds (default: all but the first)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    summaries = []
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep:
            raise SystemExit(f"error: {spec!r}: give LABEL=FOLDER")
        summaries.append(summarise(label, load_run(Path(folder))))
    same = [s for s in summaries if s["label"] in (args.same_code or [s["label"] for s in summaries[1:]])]
    spreads = spread(same)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"runs": summaries, "same_code": [s["label"] for s in same], "spread_between_generator_runs": spreads}
    for name, text in (("runs_compared.json", json.dumps(record, indent=1) + "\n"),
                       ("runs_compared.md", markdown(summaries, same, spreads))):  # fmt: skip
        if (args.out / name).exists() and not args.overwrite:
            raise SystemExit(f"error: {args.out / name} exists; pass --overwrite to replace it")
        atomic_write_text(args.out / name, text)
    print(markdown(summaries, same, spreads))


if __name__ == "__main__":
    main()

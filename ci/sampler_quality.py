"""Fast samplers against the full sampler: same trained weights, same inputs, same seeds.

Not a test: it measures. For each sampler spec (``NAME:STEPS``, see ci/benchmark_samplers.py) it runs the bundle's
own workflow (``python -m monai.bundle run RUN_ID``, default ``evaluating``) into its own folder, with the spec's
config overrides written to an overlay file there, and records wall and CPU seconds. Then, per spec:

* **to the reference**: MSE and MS-SSIM of every written volume against the reference spec's volume of the same
  name (default ``ddim:250``: the deterministic sampler at full length, so the same initial noise gives the same
  image up to the discretisation: this isolates what fewer steps cost). Volumes are compared as written ([0, 1]).
* **the bundle's own evaluation metrics**, from the ``metrics.json`` the evaluating workflow writes (e.g. Med-DDPM:
  MSE / MS-SSIM to the real scans, feature distances), mean over modalities; this is where the stochastic
  ancestral sampler (``ddpm:250``), which no deterministic sampler can match pixel for pixel, is compared.

    python ci/sampler_quality.py --bundle brats_mri_med_ddpm --bundle_root RUN \\
        --config_file configs/inference.json configs/evaluate.json configs/demo.json RUN/overlay.json \\
        --specs ddpm:250,ddim:250,ddim:50,ddim:25,ddim:10,pndm:50,pndm:25,pndm:10 --reference ddim:250 \\
        --set feature_network='"RUN/eval/feature_network.pt"' --out ci/results/sampler_quality_med_ddpm

Writes ``<out>/sampler_quality.json`` and ``<out>/sampler_quality.md`` (commit, device, versions, the command).
``python ci/sampler_quality.py --recompare OUT`` recomputes the comparisons of an earlier run without sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import REPO, environment  # noqa: E402
from benchmark_samplers import _spec, spec_overrides  # noqa: E402

#: the generated volumes of each bundle's outputs (the output folders also hold copies of the inputs: masks,
#: conditions, which every sampler writes identically and which must not dilute the comparison)
GENERATED = {
    "brats_mri_med_ddpm": ["*-t1n.nii.gz", "*-t1c.nii.gz", "*-t2w.nii.gz", "*-t2f.nii.gz"],
    "brats_mri_d3m_cemri": ["*-t1c.nii.gz"],  # the demo cohort is BraTS 2023 named
    "brain_mri_conditional_ldm": ["*.nii.gz"],
}


def _volumes(folder: Path, patterns: list[str]) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for pattern in patterns for p in sorted(folder.rglob(pattern))}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_spec(
    bundle_dir: Path,
    bundle_root: str,
    configs: list[str],
    run_id: str,
    spec: str,
    folder: Path,
    extra: dict,
    bundle: str,
) -> dict:
    from monai.bundle import ConfigParser

    folder.mkdir(parents=True, exist_ok=False)  # never mix the volumes of two runs
    files = [str(bundle_dir / c) if not os.path.isabs(c) and (bundle_dir / c).exists() else c for c in configs]
    merged = ConfigParser()
    merged.read_config(files)
    overlay = {**spec_overrides(bundle, spec), **extra, "output_dir": str(folder / "generated")}
    if "log_dir" in merged:  # evaluation workflows write their metrics.json there
        overlay["log_dir"] = str(folder)
    (folder / "overlay.json").write_text(json.dumps(overlay, indent=1))
    files.append(str(folder / "overlay.json"))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        repr(files),
        "--bundle_root",
        bundle_root,
        "--meta_file",
        str(bundle_dir / "configs" / "metadata.json"),
        "--logging_file",
        str(bundle_dir / "configs" / "logging.conf"),
    ]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=bundle_dir, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    (folder / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{spec}: the workflow failed (exit {proc.returncode}); see {folder / 'run.log'}:\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    return {"spec": spec, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "command": shlex.join(cmd)}


def compare(folder: Path, reference: Path, patterns: list[str]) -> dict:
    import torch

    from brainsynth.data.reader import read_nifti
    from brainsynth.metrics.distribution import ms_ssim

    ours, ref = _volumes(folder / "generated", patterns), _volumes(reference / "generated", patterns)
    common = sorted(set(ours) & set(ref))
    if not common:
        raise RuntimeError(f"{folder}: no volume with the same name as one of {reference}")
    mse, msssim = [], []
    for name in common:
        a = read_nifti(ours[name], np.float32)[0]
        b = read_nifti(ref[name], np.float32)[0]
        a, b = (a[..., None] if a.ndim == 3 else a), (b[..., None] if b.ndim == 3 else b)
        for c in range(a.shape[-1]):  # one modality at a time
            mse.append(float(np.mean((a[..., c] - b[..., c]) ** 2)))
            x, y = torch.from_numpy(a[..., c])[None, None], torch.from_numpy(b[..., c])[None, None]
            msssim.append(float(ms_ssim(x.clamp(0, 1), y.clamp(0, 1))[0]))
    return {"n_volumes": len(common), "mse_to_reference": _mean_sd(mse), "ms_ssim_to_reference": _mean_sd(msssim)}


def _mean_sd(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def bundle_metrics(folder: Path) -> dict:
    """Mean over modalities of the numbers in the workflow's metrics.json (Med-DDPM layout), if it wrote one."""
    path = folder / "metrics.json"
    if not path.exists():
        return {}
    per_modality = json.loads(path.read_text()).get("modalities", {})
    out: dict[str, float] = {}
    for key in ("mse", "ms_ssim", "feature_mmd", "feature_frechet_distance"):
        values = [m[key]["mean"] if isinstance(m[key], dict) else m[key] for m in per_modality.values() if key in m]
        if values:
            out[key] = float(np.mean(values))
    return out


def to_markdown(env: dict, rows: list[dict], reference: str, command: str) -> str:
    lines = [
        f"Commit {env['commit']}, {env['device']}, torch {env['torch']}, MONAI {env['monai']}, {env['date']}.",
        f"Reference for the pixel comparison: `{reference}` (same weights, inputs and seeds).",
        "",
        "| sampler | network evaluations | wall s | CPU s | MSE to ref | MS-SSIM to ref | "
        "bundle eval: MSE to real | MS-SSIM to real | Frechet distance (in-house features) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cmp, m = r.get("comparison", {}), r.get("bundle_metrics", {})
        f = lambda d: f"{d['mean']:.4f} +- {d['sd']:.4f}" if d else "-"
        g = lambda k: f"{m[k]:.4f}" if k in m else "-"
        lines.append(
            f"| `{r['spec']}` | {r['network_evaluations']} | {r['wall_s']} | {r['cpu_s']} | "
            f"{f(cmp.get('mse_to_reference'))} | {f(cmp.get('ms_ssim_to_reference'))} | {g('mse')} | "
            f"{g('ms_ssim')} | {g('feature_frechet_distance')} |"
        )
    lines += [
        "",
        "Bundle-eval columns: mean over modalities of the evaluating workflow's metrics.json (real scans of "
        "the same subjects). Command:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def recompare(out: Path) -> int:
    """Recompute the comparisons of an earlier run (its volumes and run logs stay as they are) with the current
    ``GENERATED`` patterns; the summary files are rewritten atomically and say when and at which commit."""
    from brainsynth.engine.io import atomic_write_text

    result = json.loads((out / "sampler_quality.json").read_text())
    for row in result["rows"]:
        folder = out / row["spec"].replace(":", "_")
        if row["spec"] != result["reference"]:
            row["comparison"] = compare(
                folder, out / result["reference"].replace(":", "_"), GENERATED[result["bundle"]]
            )
    now = environment()
    result["recompared"] = {"commit": now["commit"], "date": now["date"]}
    atomic_write_text(out / "sampler_quality.json", json.dumps(result, indent=1), overwrite=True)
    text = to_markdown(result["environment"], result["rows"], result["reference"], result["command"])
    text += f"Comparisons recomputed at commit {now['commit']}, {now['date']} (`--recompare`).\n"
    atomic_write_text(out / "sampler_quality.md", text, overwrite=True)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--recompare"]:
        if len(argv) != 2:
            raise SystemExit("usage: python ci/sampler_quality.py --recompare OUT")
        return recompare(Path(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--bundle_root", required=True, help="a trained run (models/model.pt)")
    ap.add_argument("--config_file", nargs="+", required=True, help="relative to the bundle folder, or absolute")
    ap.add_argument("--run_id", default="evaluating")
    ap.add_argument("--specs", required=True, help="comma-separated NAME:STEPS")
    ap.add_argument("--reference", default="ddim:250")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="extra config override")
    ap.add_argument("--out", required=True, help="a new folder")
    args = ap.parse_args(argv)

    bundle_dir = REPO / "bundles" / args.bundle
    if not bundle_dir.is_dir():
        ap.error(f"no bundle {args.bundle!r} under {REPO / 'bundles'}")
    if not (Path(args.bundle_root) / "models" / "model.pt").exists():
        ap.error(f"{args.bundle_root}: no models/model.pt (train the bundle first)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} exists and is not empty: choose a new folder (earlier results are never overwritten)")
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    if args.reference not in specs:
        specs.insert(0, args.reference)
    for spec in specs:
        spec_overrides(args.bundle, spec)  # unknown names fail before any run
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value)

    rows = []
    for spec in specs:
        print(f"sampling {spec} ...", flush=True)
        row = run_spec(
            bundle_dir,
            args.bundle_root,
            args.config_file,
            args.run_id,
            spec,
            out / spec.replace(":", "_"),
            extra,
            args.bundle,
        )
        name, steps = _spec(spec)
        row["network_evaluations"] = steps  # per volume (Med-DDPM, LDM) or per slice (D3M)
        rows.append(row)
    ref_folder = out / args.reference.replace(":", "_")
    for row in rows:
        folder = out / row["spec"].replace(":", "_")
        if row["spec"] != args.reference:
            row["comparison"] = compare(folder, ref_folder, GENERATED[args.bundle])
        row["bundle_metrics"] = bundle_metrics(folder)
    env = environment()
    command = "python ci/sampler_quality.py " + shlex.join(argv)
    result = {"environment": env, "bundle": args.bundle, "reference": args.reference, "command": command, "rows": rows}
    (out / "sampler_quality.json").write_text(json.dumps(result, indent=1))
    (out / "sampler_quality.md").write_text(to_markdown(env, rows, args.reference, command))
    print(to_markdown(env, rows, args.reference, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

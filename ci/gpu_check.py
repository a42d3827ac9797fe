"""The prepared GPU measurement behind ci/gpu_check.sh: every bundle's training stages and samplers at paper size,
each case in its own process and time limit, under one wall-clock budget, written as JSON + Markdown.

    python ci/gpu_check.py                       # on one GPU: the paper-size plan, within --budget seconds
    python ci/gpu_check.py --tiny --out DIR      # on a CPU: the same code path on demo sizes (the test suite runs it)

The plan is ordered by what matters most (the faithful fp32 recipe and the bf16 recipes of every stage, then the
samplers, then torch.compile, whose compilation is slow), so a budget that runs out loses the least. A case that
fails records its own exception; a case that the budget does not reach records that reason. Inputs are the
bundles' simulated demo cohorts, padded by each bundle's own preprocessing to the paper grid (speed and memory do
not depend on the image content), so nothing has to be downloaded or generated on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402  (ci/ is not a package)

REPO = benchmark.REPO

#: precision / memory recipes, as config overrides (every bundle has these keys in train.json and inference.json)
RECIPES = {
    "fp32": {"amp": False},
    "bf16": {"amp": True},
    "bf16+checkpointing": {"amp": True, "activation_checkpointing": True},
    "bf16+checkpointing+compile": {"amp": True, "activation_checkpointing": True, "compile": True},
    "bf16+compile": {"amp": True, "compile": True},
}
STAGES = [
    ("brats_mri_med_ddpm", "diffusion"),
    ("brats_mri_d3m_cemri", "diffusion"),
    ("brain_mri_conditional_ldm", "autoencoder"),
    ("brain_mri_conditional_ldm", "diffusion"),
]
#: each bundle's paper sampler and fast sampler (specs as in ci/benchmark_samplers.py); D3M: a whole volume
SAMPLERS = {
    "brats_mri_med_ddpm": ["ddim:25", "ddpm:250"],
    "brats_mri_d3m_cemri": ["volume:50", "volume:250"],
    "brain_mri_conditional_ldm": ["ddim:50"],
}


def plan(tiny: bool) -> list[dict]:
    """Cases in priority order."""
    size = "demo" if tiny else "paper"
    steps, warmup = (1, 0) if tiny else (3, 2)
    cases = []

    def common(bundle, recipe):
        overrides = {
            **RECIPES[recipe],
            "dataset_dir": "demo",
            "demo_cohort": benchmark.demo_cohort(bundle),
            "num_workers": 0,
        }
        if tiny:
            overrides["batch_size"] = 1
        return {"bundle": bundle, "size": size, "variant": recipe, "overrides": overrides, "threads": 0}

    def train(recipes):
        for bundle, stage in STAGES:
            for recipe in recipes:
                cases.append(
                    {
                        **common(bundle, recipe),
                        "kind": "train",
                        "stage": stage,
                        "steps": steps,
                        "warmup": warmup,
                        "count_flops": True,
                    }
                )

    def sample(which, recipe):
        for bundle, specs in SAMPLERS.items():
            for spec in specs[which]:
                if tiny:  # the same samplers, a few steps
                    spec = spec.split(":")[0] + ":2"
                case = {**common(bundle, recipe), "kind": "sample", "num_steps": spec, "repeats": 1}
                case["overrides"].pop("batch_size", None)  # sampling batch = the bundle's inference default
                cases.append(case)

    if tiny:
        train(["fp32"])
        sample(slice(0, 1), "fp32")
        return cases
    train(["fp32", "bf16", "bf16+checkpointing"])
    sample(slice(0, 1), "bf16")  # fast samplers
    train(["bf16+compile"])
    # the recipe meant to fit Med-DDPM's 192 x 192 x 144 training into 24 GB
    cases.append(
        {
            **common("brats_mri_med_ddpm", "bf16+checkpointing+compile"),
            "kind": "train",
            "stage": "diffusion",
            "steps": steps,
            "warmup": warmup,
            "count_flops": True,
        }
    )
    sample(slice(1, None), "bf16")  # the papers' full-length samplers
    return cases


def case_name(case: dict) -> str:
    return "/".join(str(case[k]) for k in ("bundle", "kind", "stage", "variant", "num_steps") if k in case)


def run(cases: list[dict], budget: float, case_timeout: float, write=lambda rows: None) -> list[dict]:
    """Run the cases in order; ``write(rows)`` after each, so a run cut short keeps what it measured."""
    start = time.monotonic()
    rows = []
    for case in cases:
        left = budget - (time.monotonic() - start)
        if left < 20:
            result = {"error": f"skipped: the {budget:.0f} s budget of this check was spent before this case"}
        else:
            result = benchmark._run_in_subprocess(case, min(case_timeout, left))
        rows.append({**case, "result": result})
        shown = {k: case.get(k) for k in ("bundle", "kind", "stage", "variant", "num_steps") if k in case}
        brief = {k: v for k, v in result.items() if k not in ("traceback", "step_times")}
        print(json.dumps({**shown, "result": brief}), flush=True)
        write(rows)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """The figures the performance goals ask for, read off the rows."""

    def find(bundle, kind, variant, stage=None, steps=None):
        return next(
            (
                r["result"]
                for r in rows
                if r["bundle"] == bundle
                and r["kind"] == kind
                and r["variant"] == variant
                and (stage is None or r.get("stage") == stage)
                and (steps is None or r.get("num_steps") == steps)
                and "error" not in r["result"]
            ),
            None,
        )

    lines = []
    med = "brats_mri_med_ddpm"
    fp32, fit = find(med, "train", "fp32", "diffusion"), find(med, "train", "bf16+checkpointing", "diffusion")
    fastest = min(
        (r["result"] for r in rows if r["bundle"] == med and r["kind"] == "train" and "error" not in r["result"]),
        key=lambda res: res["seconds_per_step"],
        default=None,
    )
    if fit:
        lines.append(
            f"- Med-DDPM training, bf16 + activation checkpointing: peak {fit['peak_memory_mb'] / 1024:.1f} GB "
            f"CUDA memory (goal: within 24 GB)."
        )
    if fp32 and fastest and fastest is not fp32:
        lines.append(
            f"- Med-DDPM training throughput, fastest recipe vs faithful fp32: "
            f"{fp32['seconds_per_step'] / fastest['seconds_per_step']:.2f}x (goal >= 2x)."
        )
    vol = find("brats_mri_d3m_cemri", "sample", "bf16", steps="volume:50")
    if vol:
        key = next(k for k in vol if k.startswith("seconds_per_"))
        lines.append(f"- D3M whole volume, 50 steps: {vol[key]:.1f} s (goal <= 20 s on an H100-class GPU).")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="demo sizes, one step each: the CPU smoke run of this check")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="wall-clock seconds for all cases (default 330 on a GPU, 900 for --tiny)",
    )
    ap.add_argument("--case-timeout", type=float, default=150)
    ap.add_argument("--out", default=str(REPO / "ci" / "results"))
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings; run only the planned cases whose name "
        "(bundle/kind/stage/variant/steps) contains one, in plan order, e.g. 'sample,compile'",
    )
    args = ap.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit(
            "ci/gpu_check.py: no CUDA device is visible; run it on a GPU machine, or add --tiny for the CPU smoke run"
        )
    budget = args.budget or (900.0 if args.tiny else 330.0)
    env = benchmark.environment()
    cases = plan(args.tiny)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        cases = [c for c in cases if any(w in case_name(c) for w in wanted)]
    mode = "tiny" if args.tiny else "gpu"
    command = "python ci/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{mode}_{time.strftime('%Y%m%d-%H%M%S')}"

    def write(rows):
        report = {
            "command": command,
            "mode": mode,
            "budget_s": budget,
            "environment": env,
            "rows": rows,
            "planned": len(cases),
            "summary": summary(rows),
        }
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        markdown = benchmark.to_markdown(env, rows, command) + "\n" + "\n".join(report["summary"]) + "\n"
        (out / f"{stem}.md").write_text(markdown)
        return markdown

    rows = run(cases, budget, args.case_timeout, write)
    print(write(rows))
    failed = [r for r in rows if "error" in r["result"]]
    print(f"{len(rows) - len(failed)} cases measured, {len(failed)} not measured; results in {out / stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

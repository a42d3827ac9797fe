"""The one run a lent GPU gets (``bash ci/gpu_check.sh``): the paths every user runs, on CUDA, checked, then the
paper-size timing and memory cases in the time left. Exit status 0 only when every check passed.

    bash ci/gpu_check.sh --out DIR                     # on the GPU machine: demo size, NCCL, then paper-size timing
    bash ci/gpu_check.sh --device cpu --out DIR        # the same list at the tiny size, gloo (the test suite runs it)
    bash ci/gpu_check.sh --device cpu --only brats_mri_med_ddpm/train --override no_such_key=1   # must fail

The list, per bundle, each step its own process (``python -m monai.bundle run`` from the bundle folder, as a user
runs it, so ``initialize``, data loading, Invertd, the writers, weight loading and the handlers all run):

1. training of every stage, amp on, previews / diagnostics / condition sensitivity every iteration, a few
   iterations; the final weights must be written;
2. inference with every sampler of the bundle, each producing at least two volumes (state a sampler carries from
   one call to the next shows on the second); every written volume must be finite;
3. the bundle's evaluate workflow, whose written numbers must be finite;
4. ``torchrun --nproc_per_node 1`` on every ``multi_gpu_*`` overlay (NCCL on CUDA, gloo on a CPU): the training
   stages, then sharded inference;

then one tiny model's forward pass and short sampling on the CPU and on CUDA, compared (in CPU mode both run on the
CPU: the code path only), and on CUDA the paper-size timing / memory cases (ci/benchmark.py) in the time left.
Sizes: on CUDA the bundles' demo overlays with few iterations and the small simulated cohorts of
tests/tiny_bundles.py; in CPU mode the tiny overlays of tests/tiny_bundles.py (one definition of the tiny size).
A report (JSON + Markdown, one row per step with its seconds, status and the end of its log) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))
sys.path.insert(0, str(REPO / "tests"))

import benchmark  # noqa: E402  (ci/ is not a package)
from tiny_bundles import TINY, runner_command  # noqa: E402  (the one definition of the tiny size)

#: per bundle: its inference configs, samplers, items argument (at least two volumes), what every iteration logs
BUNDLES = {
    "brats_mri_med_ddpm": {
        "inference": ["train.json", "inference.json"],
        "samplers": ["ddpm", "ddim", "dpmpp", "unipc"],
        "items": ["--split", "all"],
        "every_iteration": {"preview_every": 1},
        "weights": ["model.pt"],
        "evaluate": {"feature_input_shape": [16, 16, 16], "feature_epochs": 1},
    },
    "brats_mri_d3m_cemri": {
        "inference": ["inference.json"],
        "samplers": ["ddim"],
        "items": ["--split", "all"],
        "every_iteration": {"preview_every": 1, "diagnostics_every": 1},
        "weights": ["model.pt"],
        "evaluate": {},
    },
    "brain_mri_conditional_ldm": {
        "inference": ["inference.json"],
        "samplers": ["ddim"],
        "items": ["--num_samples", "2"],
        "every_iteration": {"preview_every": 1, "condition_sensitivity_every": 1},
        "weights": ["model_autoencoder.pt", "model.pt"],
        "evaluate": {"eval_num_samples": 2, "feature_network_epochs": 1, "feature_network_input_shape": [16, 16, 16]},
    },
}
#: what the CUDA run takes from the tiny overlays: the iteration counts and the small cohorts, not the network sizes
SCHEDULE_KEYS = {
    "demo_cohort",
    "epoch_length",
    "max_epochs",
    "ae_epoch_length",
    "ae_max_epochs",
    "diffusion_epoch_length",
    "diffusion_max_epochs",
    "scale_factor_batches",
    "ema_start_step",
    "num_inference_steps",
    "preview_steps",
    "progress",
}
#: the multi-GPU overlays: the training overlay of each stage, in stage order, then sharded inference
MULTI_GPU_TRAIN = {
    "brats_mri_med_ddpm": ["multi_gpu_train.json"],
    "brats_mri_d3m_cemri": ["multi_gpu_train.json"],
    "brain_mri_conditional_ldm": ["multi_gpu_train_autoencoder.json", "multi_gpu_train_diffusion.json"],
}


def size_overlay(bundle: str, device: str, cache_dir: Path) -> dict:
    """Everything this check sets for ``bundle`` on top of its demo overlay."""
    tiny = TINY[bundle]["overlay"]
    overlay = dict(tiny) if device == "cpu" else {k: v for k, v in tiny.items() if k in SCHEDULE_KEYS}
    overlay.update({"amp": True, "cache_dir": str(cache_dir), "num_workers": 0, "progress": False, "seed": 0})
    overlay.update(BUNDLES[bundle]["every_iteration"])
    overlay.update(BUNDLES[bundle]["evaluate"])  # read by the evaluate workflow only
    if device == "cpu" and bundle == "brats_mri_med_ddpm":
        overlay["num_train_timesteps"] = 50  # the ancestral sampler runs all of them, twice, on a CPU
    return overlay


def plan(device: str, out: Path, overrides: list[str]) -> list[dict]:
    """Every step, in order; each is (name, command, folder, what its outputs must show)."""
    extra_args = [a for kv in overrides for a in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    steps = []
    for bundle, spec in BUNDLES.items():
        work = out / "work" / bundle
        overlay = work / "size.json"
        stages = TINY[bundle]["stages"]

        def step(name, run_id, configs, root, *args, extra=(), checks=None, launch=(), write=None):
            cmd = runner_command(
                bundle, run_id, configs, overlay, root, *args, *extra_args, extra=extra, launcher=launch
            )
            steps.append(
                {
                    "name": f"{bundle}/{name}",
                    "bundle": bundle,
                    "cmd": cmd,
                    "overlay": str(overlay),
                    "size": size_overlay(bundle, device, out / "work" / "cache"),
                    "checks": checks or {},
                    "write": write or {},
                }
            )

        root = work / "single"
        for i, stage in enumerate(stages):
            step(
                f"train/{'+'.join(stage)}",
                "training",
                stage,
                root,
                checks={"weights": [str(root / "models" / spec["weights"][i])]},
            )
        for sampler in spec["samplers"]:
            for_sampler = root / f"outputs_{sampler}"
            step(
                f"inference/{sampler}",
                "inference",
                spec["inference"],
                root,
                "--sampler",
                sampler,
                "--output_dir",
                for_sampler,
                *spec["items"],
                checks={"volumes": [str(for_sampler), 2]},
            )
        step(
            "evaluate",
            "evaluating",
            ["inference.json", "evaluate.json"],
            root,
            checks={"finite_json": [str(root / "eval")]},
        )
        ddp = work / "ddp"
        for i, (stage, overlay_name) in enumerate(zip(stages, MULTI_GPU_TRAIN[bundle])):
            step(
                f"torchrun/{overlay_name}",
                "training",
                stage,
                ddp,
                extra=[overlay_name],
                launch=launcher,
                checks={"weights": [str(ddp / "models" / spec["weights"][i])]},
            )
        sharded = ddp / "outputs_sharded"
        step(
            "torchrun/multi_gpu_inference.json",
            "inference",
            spec["inference"],
            ddp,
            "--output_dir",
            sharded,
            *spec["items"],
            extra=["multi_gpu_inference.json"],
            launch=launcher,
            checks={"volumes": [str(sharded), 2]},
        )
    steps.append({"name": "compare/cpu_vs_" + device, "cmd": [sys.executable, __file__, "--compare", device]})
    return steps


# --- checks of what a step wrote --------------------------------------------------------------------------------
def _finite_volumes(folder: Path, at_least: int) -> str | None:
    import nibabel as nib
    import numpy as np

    volumes = sorted(folder.rglob("*.nii.gz"))
    if len(volumes) < at_least:
        return f"{folder}: {len(volumes)} volume(s) written, expected at least {at_least}"
    for path in volumes:
        if not np.isfinite(nib.load(path).get_fdata()).all():
            return f"{path}: non-finite voxels"
    return None


def numbers_in(obj) -> list[float]:
    """Every number in a JSON value (booleans are not numbers)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers_in(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers_in(v)]
    return []


def check_outputs(checks: dict) -> str | None:
    """None when every check holds, else the first problem."""
    for path in checks.get("weights", []):
        if not Path(path).is_file():
            return f"{path}: final weights not written"
    if "volumes" in checks:
        problem = _finite_volumes(Path(checks["volumes"][0]), checks["volumes"][1])
        if problem:
            return problem
    for folder in checks.get("finite_json", []):
        tables = sorted(Path(folder).rglob("*.json")) + sorted(Path(folder).rglob("*.csv"))
        if not tables:
            return f"{folder}: the evaluation wrote no table"
        for table in Path(folder).rglob("*.json"):
            values = numbers_in(json.loads(table.read_text()))
            if not all(math.isfinite(v) for v in values):
                return f"{table}: non-finite numbers"
    return None


def run_step(step: dict, timeout: float, logs: Path) -> dict:
    for path, content in step.get("write", {}).items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(content))
    if "overlay" in step:
        Path(step["overlay"]).parent.mkdir(parents=True, exist_ok=True)
        Path(step["overlay"]).write_text(json.dumps(step["size"]))
    cwd = REPO / "bundles" / step["bundle"] if "bundle" in step else REPO
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "common"), env.get("PYTHONPATH", "")])
    log = logs / (step["name"].replace("/", "__") + ".log")
    start = time.monotonic()
    try:
        proc = subprocess.run(step["cmd"], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        output, returncode = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output, returncode = output + f"\n(killed after {timeout:.0f} s)", None
    seconds = time.monotonic() - start
    log.write_text(" ".join(map(str, step["cmd"])) + "\n\n" + output)
    problem = None
    if returncode != 0:
        last = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        problem = f"exit status {returncode}: {last[0][:300]}"
    else:
        problem = check_outputs(step.get("checks", {}))
    return {
        "name": step["name"],
        "seconds": round(seconds, 1),
        "ok": problem is None,
        "problem": problem,
        "log": str(log),
    }


# --- the tiny model on the CPU and on the device ----------------------------------------------------------------
def compare(device: str) -> int:
    """One tiny Med-DDPM network (fp32, TF32 off): its forward pass and a 3-step DDIM sample on the CPU and on
    ``device``; prints the largest differences, exits 1 when they exceed what float32 kernels may differ by."""
    import torch
    from monai.networks.nets import DiffusionModelUNet

    from brainsynth.conditioning.semantic_mask import MaskConditionedSampler
    from brainsynth.schedulers.ddim import ExactDDIMScheduler

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    network = DiffusionModelUNet(
        3,
        9,
        4,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=8,
    )
    torch.nn.init.normal_(network.out[-1].conv.weight, std=0.05)  # MONAI zero-initialises the head
    x = torch.randn(2, 9, 16, 16, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    condition = (torch.rand(1, 5, 16, 16, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    results = {}
    for where in ("cpu", device):
        net = network.to(where).eval()
        with torch.no_grad():
            forward = net(x.to(where), timesteps=t.to(where)).cpu()
        sampler = MaskConditionedSampler(ExactDDIMScheduler(100, clip_sample=True), 4, 3, progress=False, seed=3)
        samples = [sampler(condition.to(where), net).cpu() for _ in range(2)]  # twice: state between calls
        results[where] = (forward, samples)
    forward_diff = (results["cpu"][0] - results[device][0]).abs().max().item()
    sample_diff = max((a - b).abs().max().item() for a, b in zip(results["cpu"][1], results[device][1]))
    finite = all(torch.isfinite(s).all() for s in results[device][1])
    print(json.dumps({"device": device, "forward_max_abs_diff": forward_diff, "sample_max_abs_diff": sample_diff}))
    ok = finite and forward_diff < 1e-3 and sample_diff < 1e-2
    if not ok:
        print(f"CPU and {device} disagree beyond float32 kernel differences (or non-finite samples)", file=sys.stderr)
    return 0 if ok else 1


# --- paper-size timing and memory (CUDA only, in the time left) -------------------------------------------------
RECIPES = {
    "fp32": {"amp": False},
    "bf16": {"amp": True},
    "bf16+checkpointing": {"amp": True, "activation_checkpointing": True},
    "bf16+checkpointing+compile": {"amp": True, "activation_checkpointing": True, "compile": True},
    "bf16+compile": {"amp": True, "compile": True},
}


def timing_plan() -> list[dict]:
    """Paper-size cases in priority order: the memory goal first (Med-DDPM bf16 + checkpointing + compile), the D3M
    whole volume at 50 steps, then the recipes of every stage (ci/benchmark.py measures each)."""

    def case(bundle, recipe, **kw):
        overrides = {
            **RECIPES[recipe],
            "dataset_dir": "demo",
            "demo_cohort": benchmark.demo_cohort(bundle),
            "num_workers": 0,
        }
        return {"bundle": bundle, "size": "paper", "variant": recipe, "overrides": overrides, "threads": 0, **kw}

    def train(bundle, stage, recipe):
        return case(bundle, recipe, kind="train", stage=stage, steps=3, warmup=2, count_flops=True)

    cases = [
        train("brats_mri_med_ddpm", "diffusion", "bf16+checkpointing+compile"),
        case("brats_mri_d3m_cemri", "bf16", kind="sample", num_steps="volume:50", repeats=1),
        train("brats_mri_med_ddpm", "diffusion", "fp32"),
        train("brats_mri_med_ddpm", "diffusion", "bf16"),
        case("brats_mri_med_ddpm", "bf16", kind="sample", num_steps="ddim:25", repeats=1),
        case("brain_mri_conditional_ldm", "bf16", kind="sample", num_steps="ddim:50", repeats=1),
    ]
    for bundle, stage in [
        ("brats_mri_d3m_cemri", "diffusion"),
        ("brain_mri_conditional_ldm", "autoencoder"),
        ("brain_mri_conditional_ldm", "diffusion"),
    ]:
        cases += [train(bundle, stage, "fp32"), train(bundle, stage, "bf16")]
    return cases


def run_timing(cases: list[dict], seconds_left, logs: Path) -> list[dict]:
    rows = []
    for case in cases:
        left = seconds_left()
        name = "timing/" + "/".join(
            str(case[k]) for k in ("bundle", "kind", "stage", "variant", "num_steps") if k in case
        )
        if left < 30:
            rows.append(
                {
                    "name": name,
                    "seconds": 0,
                    "ok": True,
                    "problem": None,
                    "measured": None,
                    "note": "not reached within the 8-minute budget",
                }
            )
            continue
        start = time.monotonic()
        result = benchmark._run_in_subprocess(case, left - 10)
        brief = {k: v for k, v in result.items() if k not in ("traceback", "step_times")}
        timed_out = "timed out" in str(result.get("error", "")) or "timeout" in str(result.get("error", "")).lower()
        failed = "error" in result and not timed_out
        rows.append(
            {
                "name": name,
                "seconds": round(time.monotonic() - start, 1),
                "ok": not failed,
                "problem": result.get("error") if failed else None,
                "measured": brief,
                "note": "stopped at the budget" if timed_out else "",
            }
        )
        (logs / (name.replace("/", "__") + ".json")).write_text(json.dumps(result, indent=1))
    return rows


def to_markdown(report: dict) -> str:
    lines = [
        f"# gpu_check ({report['device']}), {report['started']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit {report['environment'].get('commit')}, torch {report['environment'].get('torch')}, "
        f"device {report['environment'].get('device')}; {report['seconds']:.0f} s in all; "
        f"**{'PASS' if report['ok'] else 'FAIL'}** ({sum(not r['ok'] for r in report['steps'])} failed).",
        "",
        "| step | status | seconds | problem / measurement |",
        "|---|---|---|---|",
    ]
    for row in report["steps"]:
        detail = row.get("problem") or row.get("note") or ""
        if row.get("measured"):
            detail = json.dumps({k: v for k, v in row["measured"].items() if not isinstance(v, (dict, list))})
        status = "PASS" if row["ok"] else "FAIL"
        lines.append(f"| {row['name']} | {status} | {row['seconds']} | {str(detail).replace('|', '/')[:400]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default=str(REPO / "ci" / "results" / "gpu_check"))
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="wall-clock seconds for everything (default: 480, the 8 minutes of a lent GPU; with --device cpu 7200)",
    )
    ap.add_argument("--step-timeout", type=float, default=None, help="seconds per step (default: the budget left)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the step names to run")
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE added to every bundle run")
    ap.add_argument("--no-timing", action="store_true", help="skip the paper-size timing cases")
    ap.add_argument("--compare", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args.compare)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "ci/gpu_check.py: no CUDA device is visible; run it on a GPU machine, or add --device cpu for the CPU mode"
        )
    if args.budget is None:
        args.budget = 480.0 if args.device == "cuda" else 7200.0
    for kv in args.override:
        if "=" not in kv:
            raise SystemExit(f"--override {kv!r}: expected KEY=VALUE")
    started = time.monotonic()
    out = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = out / f"run_{args.device}_{stamp}"
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = plan(args.device, run_dir, args.override)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        steps = [s for s in steps if any(w in s["name"] for w in wanted)]
    if not steps:
        raise SystemExit(f"ci/gpu_check.py: no step matches --only {args.only!r}")

    def seconds_left():
        return args.budget - (time.monotonic() - started)

    rows = []
    for step in steps:
        left = seconds_left()
        if left < 5:
            rows.append(
                {
                    "name": step["name"],
                    "seconds": 0,
                    "ok": False,
                    "log": "",
                    "problem": f"not run: the {args.budget:.0f} s budget was spent",
                }
            )
        else:
            rows.append(run_step(step, min(args.step_timeout or left, left), logs))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "log"}), flush=True)
    if args.device == "cuda" and not args.no_timing and not args.only:
        rows += run_timing(timing_plan(), seconds_left, logs)
    env = benchmark.environment()
    command = "bash ci/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command,
        "device": args.device,
        "started": stamp,
        "environment": env,
        "steps": rows,
        "seconds": time.monotonic() - started,
        "ok": all(r["ok"] for r in rows),
    }
    (out / f"gpu_check_{args.device}_{stamp}.json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report)
    (out / f"gpu_check_{args.device}_{stamp}.md").write_text(markdown)
    print(markdown)
    failed = [r["name"] for r in rows if not r["ok"]]
    if failed:
        print(
            f"gpu_check: {len(failed)} of {len(rows)} steps failed: {', '.join(failed)}; logs in {logs}",
            file=sys.stderr,
        )
        return 1
    print(f"gpu_check: all {len(rows)} steps passed in {report['seconds']:.0f} s; report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

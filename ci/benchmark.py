"""Benchmark harness: training speed, sampling speed and peak memory of each bundle, from its own configs.

Not a test: it measures. Each case runs in a fresh subprocess (so peak memory is that case's alone) and the results
go to JSON and a Markdown table that record the commit, device, torch / MONAI versions, machine load and the exact
settings (command line and config overrides).

    python ci/benchmark.py --bundle brats_mri_med_ddpm --size demo --threads 1
    python ci/benchmark.py --bundle all --size demo --variants baseline,sdpa,channels_last,checkpointing,compile
    python ci/benchmark.py --bundle brats_mri_med_ddpm --size paper --variants baseline,bf16,bf16+checkpointing

Sizes: ``demo`` = the bundle's configs + demo.json; ``paper`` = the configs alone (the authors' grid, network and
batch size). Data: the bundle's simulated demo cohort by default, padded / resampled to the chosen grid by the
bundle's own preprocessing (speed and memory do not depend on the image content); ``--data real`` keeps the
configs' ``dataset_dir``. Training: the bundle's own ``train#trainer`` (every stage; handlers included), fed one
real preprocessed batch repeated, so the figure is compute, not data loading; seconds per iteration is the median
after ``--warmup`` iterations, with the process CPU seconds of the same iterations beside it (CPU time well above
wall time x threads, or wall well above CPU, shows contention). Sampling: the bundle's inference sampler (adapters
in ci/benchmark_samplers.py), timed per step spec. Variants are config overrides (``ACCELERATIONS``), joined with
'+'. Peak memory: CUDA max allocated on a GPU, the case process's peak resident set size on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("brats_mri_med_ddpm", "brats_mri_d3m_cemri", "brain_mri_conditional_ldm")

#: each acceleration is a set of config overrides; bundles expose these keys in train.json / inference.json
ACCELERATIONS: dict[str, dict] = {
    "baseline": {},
    "bf16": {"amp": True},
    "sdpa": {"use_flash_attention": True},
    "channels_last": {"channels_last": True},
    "checkpointing": {"activation_checkpointing": True},
    "compile": {"compile": True},
}


def variant_overrides(variant: str) -> dict:
    out: dict = {}
    for part in variant.split("+"):
        if part not in ACCELERATIONS:
            raise SystemExit(f"unknown variant part {part!r}; valid: {', '.join(ACCELERATIONS)} (join with '+')")
        out.update(ACCELERATIONS[part])
    return out


def _config_files(bundle: str, base: str | list[str], size: str) -> list[str]:
    cfg = REPO / "bundles" / bundle / "configs"
    files = [cfg / b for b in ([base] if isinstance(base, str) else base)]
    if size == "demo":
        files.append(cfg / "demo.json")
    return [str(f) for f in files]


def _parser(bundle: str, files: list[str], overrides: dict, workdir: str):
    from monai.bundle import ConfigParser

    # as under `python -m monai.bundle run` from the bundle folder: its `scripts` package is importable (one bundle
    # per case process, so the bundles' `scripts` packages never meet)
    sys.path.insert(0, str(REPO / "bundles" / bundle))
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = workdir
    for k, v in overrides.items():
        if k not in parser:
            raise KeyError(f"{bundle}: config key {k!r} not defined")
        parser[k] = v
    return parser


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _repeat(batch, n):
    for _ in range(n):
        yield batch


def run_train_case(case: dict) -> dict:
    """Time ``steps`` training iterations of the bundle's trainer on one repeated real batch."""
    import torch
    from ignite.engine import Events

    from benchmark_samplers import TRAIN_STAGES  # the stages of each bundle, in merge order

    torch.manual_seed(0)
    _, stage_configs, setup = next(s for s in TRAIN_STAGES[case["bundle"]] if s[0] == case["stage"])
    files = _config_files(case["bundle"], stage_configs, case["size"])
    with tempfile.TemporaryDirectory() as workdir:
        overrides = dict(case["overrides"])
        # demo runs share the cohort cache in the repository's bundle folder so it is built once
        overrides.setdefault("cache_dir", str(REPO / "bundles" / case["bundle"] / "cache"))
        parser = _parser(case["bundle"], files, overrides, workdir)
        if setup is not None:
            setup(parser)
        trainer_id = case.get("trainer_id", "train#trainer")
        loader = parser.get_parsed_content(trainer_id.rsplit("#", 1)[0] + "#dataloader")
        batch = next(iter(loader))
        trainer = parser.get_parsed_content(trainer_id, instantiate=True)
        device = torch.device(parser.get_parsed_content("device"))
        steps = case["warmup"] + case["steps"]
        trainer.data_loader = _repeat(batch, steps)
        trainer.state.epoch_length = steps
        trainer.state.max_epochs = 1
        times: list[float] = []
        cpu_times: list[float] = []
        tick = {}

        def start(_):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tick["t"], tick["cpu"] = time.perf_counter(), time.process_time()

        def stop(_):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - tick["t"])
            cpu_times.append(time.process_time() - tick["cpu"])

        trainer.add_event_handler(Events.ITERATION_STARTED, start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.run()
        measured = times[case["warmup"]:]
        batch_size = int(parser.get_parsed_content("batch_size")) if "batch_size" in parser else 1
        sec = statistics.median(measured)
        return {"seconds_per_step": sec, "samples_per_second": batch_size / sec, "batch_size": batch_size,
                "cpu_seconds_per_step": statistics.median(cpu_times[case["warmup"]:]),
                "peak_memory_mb": _peak_memory_mb(device), "steps_timed": len(measured),
                "step_times": measured, "device": str(device)}


def run_sample_case(case: dict) -> dict:
    """Time the bundle's sampler for one volume (or slice) at ``num_steps``."""
    import torch

    from benchmark_samplers import SAMPLERS  # one adapter per bundle

    files = _config_files(case["bundle"], case.get("inference_config", "inference.json"), case["size"])
    with tempfile.TemporaryDirectory() as workdir:
        overrides = dict(case["overrides"])
        overrides.setdefault("cache_dir", str(REPO / "bundles" / case["bundle"] / "cache"))
        parser = _parser(case["bundle"], files, overrides, workdir)
        sampling = SAMPLERS[case["bundle"]](parser, case["num_steps"])
        run_once, unit, device = sampling.run_once, sampling.unit, sampling.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(case["repeats"]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            n_units = run_once()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t) / max(n_units, 1))
        return {"seconds_per_" + unit: statistics.median(times), "unit": unit, "num_steps": case["num_steps"],
                "network_evaluations": sampling.network_evaluations, "peak_memory_mb": _peak_memory_mb(device), "device": str(device)}


def _run_in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "_case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCHMARK_RESULT "):
            return json.loads(line[len("BENCHMARK_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}"}


def environment() -> dict:
    import monai
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=REPO).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                 f"torch threads {torch.get_num_threads()}"
    return {"commit": commit + ("+dirty" if dirty else ""), "device": device, "torch": torch.__version__,
            "monai": monai.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def to_markdown(env: dict, rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`  ",
             f"Commit {env['commit']}, {env['device']}, torch {env['torch']}, MONAI {env['monai']}, "
             f"Python {env['python']}, {env['date']}, load average {env.get('load_average_1_5_15min')}", "",
             "| bundle | size | variant | measure | value | peak memory (MB) | settings |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r["result"]
        if "error" in res:
            measure, value, mem = r["kind"], f"not measured: {res['error'][:120]}", "-"
        elif r["kind"] == "train":
            measure = f"train s/step (median), {r['stage']} stage"
            value = f"{res['seconds_per_step']:.3f} ({res['samples_per_second']:.2f} samples/s)"
            if "cpu_seconds_per_step" in res:
                value += f", CPU {res['cpu_seconds_per_step']:.3f} s"
            mem = f"{res['peak_memory_mb']:.0f}"
        else:
            measure = f"sample s/{res['unit']}, {res['num_steps']} ({res['network_evaluations']} network calls)"
            value = f"{res['seconds_per_' + res['unit']]:.2f}"
            mem = f"{res['peak_memory_mb']:.0f}"
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        lines.append(f"| {r['bundle']} | {r['size']} | {r['variant']} | {measure} | {value} | {mem} | {settings} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_case":
        case = json.loads(argv[1])
        if case.get("threads"):
            import torch

            torch.set_num_threads(int(case["threads"]))
        result = run_train_case(case) if case["kind"] == "train" else run_sample_case(case)
        print("BENCHMARK_RESULT " + json.dumps(result))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="all", help=f"one of {', '.join(BUNDLES)}, or all")
    ap.add_argument("--size", choices=("demo", "paper"), default="demo")
    ap.add_argument("--variants", default="baseline", help="comma-separated; parts joined with '+': "
                    + ", ".join(ACCELERATIONS))
    ap.add_argument("--measure", default="train,sample", help="train, sample or both")
    ap.add_argument("--sample-steps", default="", help="comma-separated SAMPLER:STEPS, e.g. ddpm:250,ddim:50 "
                    "(default: per bundle, see ci/benchmark_samplers.py)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="sampling repeats (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each case (0: torch default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="extra config override")
    ap.add_argument("--data", choices=("demo", "real"), default="demo",
                    help="demo: the simulated cohort at either size; real: the configs' dataset_dir (or --set it)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(REPO / "ci" / "results"))
    args = ap.parse_args(argv)

    bundles = BUNDLES if args.bundle == "all" else (args.bundle,)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.data == "demo":
        extra.setdefault("dataset_dir", "demo")  # paper-size configs point at real data by default
    from benchmark_samplers import DEFAULT_SAMPLE_STEPS, TRAIN_STAGES

    env = environment()
    rows = []
    for bundle in bundles:
        for variant in args.variants.split(","):
            overrides = {**variant_overrides(variant), **extra}
            base = {"bundle": bundle, "size": args.size, "variant": variant, "overrides": overrides,
                    "threads": args.threads}
            if "train" in args.measure:
                for stage, _, _ in TRAIN_STAGES[bundle]:
                    case = {**base, "kind": "train", "stage": stage, "steps": args.steps, "warmup": args.warmup}
                    rows.append({**case, "result": _run_in_subprocess(case, args.timeout)})
                    print(json.dumps({k: rows[-1][k] for k in ("bundle", "variant", "stage", "result")}), flush=True)
            if "sample" in args.measure:
                specs = [s for s in args.sample_steps.split(",") if s] or DEFAULT_SAMPLE_STEPS[bundle]
                for spec in specs:
                    case = {**base, "kind": "sample", "num_steps": spec, "repeats": args.repeats}
                    rows.append({**case, "result": _run_in_subprocess(case, args.timeout)})
                    print(json.dumps({k: rows[-1][k] for k in ("bundle", "variant", "kind", "result")}), flush=True)
    command = "python ci/benchmark.py " + " ".join(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"benchmark_{args.bundle}_{args.size}_{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(to_markdown(env, rows, command))
    print(to_markdown(env, rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def demo_cohort(bundle: str) -> dict:
    """The ``demo_cohort`` of a bundle's demo overlay."""
    return json.loads((REPO / "bundles" / bundle / "configs" / "demo.json").read_text()).get("demo_cohort", {})


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


def _samples_in(batch) -> int:
    """Samples in one collated batch (D3M's loader yields several slices per volume, so not loader.batch_size)."""
    import torch

    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    return next(int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.ndim > 0)


def _repeat(batch, n):
    for _ in range(n):
        yield batch


def run_train_case(case: dict) -> dict:
    """Time ``steps`` training iterations of the bundle's trainer on one repeated real batch."""
    import torch
    from benchmark_samplers import TRAIN_STAGES, stage_overrides  # the stages of each bundle, in merge order
    from ignite.engine import Events
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    _, stage_configs, setup = next(s for s in TRAIN_STAGES[case["bundle"]] if s[0] == case["stage"])
    files = _config_files(case["bundle"], stage_configs, case["size"])
    with tempfile.TemporaryDirectory() as workdir:
        overrides = stage_overrides(case["bundle"], case["stage"], case["overrides"])
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
        count_flops = bool(case.get("count_flops")) and not case["overrides"].get("compile")
        trainer.data_loader = _repeat(batch, steps + int(count_flops))
        trainer.state.epoch_length = steps + int(count_flops)
        trainer.state.max_epochs = 1
        times: list[float] = []
        cpu_times: list[float] = []
        tick: dict = {}

        def start(engine):
            if engine.state.iteration > steps:  # one extra, untimed iteration counts the FLOPs
                tick["flops"] = FlopCounterMode(display=False)
                tick["flops"].__enter__()
                return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tick["t"], tick["cpu"] = time.perf_counter(), time.process_time()

        def stop(engine):
            if engine.state.iteration > steps:
                tick["flops"].__exit__(None, None, None)
                return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - tick["t"])
            cpu_times.append(time.process_time() - tick["cpu"])

        trainer.add_event_handler(Events.ITERATION_STARTED, start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.run()
        measured = times[case["warmup"] :]
        batch_size = _samples_in(batch)
        sec = statistics.median(measured)
        result = {
            "seconds_per_step": sec,
            "samples_per_second": batch_size / sec,
            "batch_size": batch_size,
            "cpu_seconds_per_step": statistics.median(cpu_times[case["warmup"] :]),
            "peak_memory_mb": _peak_memory_mb(device),
            "steps_timed": len(measured),
            "step_times": measured,
            "device": str(device),
        }
        if "flops" in tick:
            result.update(flop_utilisation(tick["flops"].get_total_flops(), sec, device, case["overrides"]))
        return result


#: dense peak rates (TFLOP/s) from NVIDIA's H100 / H200 SXM datasheets: bf16 tensor cores, and TF32, which PyTorch
#: uses for fp32 convolutions by default (torch.backends.cudnn.allow_tf32)
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "tf32": 494.0}, "H200": {"bf16": 989.0, "tf32": 494.0}}


def flop_utilisation(flops: int, seconds: float, device, overrides: dict) -> dict:
    """Counted FLOPs of one training step (torch's FlopCounterMode: matmuls and convolutions, forward and backward,
    recomputation under activation checkpointing included), achieved TFLOP/s and the fraction of the datasheet peak."""
    import torch

    out = {"flops_per_step": int(flops), "achieved_tflops": flops / seconds / 1e12}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peaks:
            precision = "bf16" if overrides.get("amp") else "tf32"
            out["model_flop_utilisation"] = out["achieved_tflops"] / peaks[precision]
            out["mfu_reference"] = f"{peaks[precision]:.0f} TFLOP/s {precision} dense ({name})"
    return out


def run_sample_case(case: dict) -> dict:
    """Time the bundle's sampler for one volume (or slice) at ``num_steps``."""
    import torch
    from benchmark_samplers import SAMPLERS  # one adapter per bundle

    files = _config_files(case["bundle"], case.get("inference_config", "inference.json"), case["size"])
    with tempfile.TemporaryDirectory() as workdir:
        overrides = dict(case["overrides"])
        overrides.setdefault("cache_dir", str(REPO / "bundles" / case["bundle"] / "cache"))
        parser = _parser(case["bundle"], files, overrides, workdir)
        sampling = SAMPLERS[case["bundle"]](parser, case["num_steps"], case["size"])
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
        return {
            "seconds_per_" + unit: statistics.median(times),
            "unit": unit,
            "num_steps": case["num_steps"],
            "network_evaluations": sampling.network_evaluations,
            "peak_memory_mb": _peak_memory_mb(device),
            "device": str(device),
        }


def limit_memory(case: dict) -> None:
    """On a CPU, cap the case's address space below the machine's memory so that a case too large for it fails
    with an allocation error (reported as such) instead of swapping or taking the machine down."""
    if case.get("memory_limit_gb") is None or _cuda_requested():
        return
    limit = int(float(case["memory_limit_gb"]) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _cuda_requested() -> bool:
    import torch

    return torch.cuda.is_available()


def machine_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def case_error(exc: BaseException) -> dict:
    import traceback

    root = exc  # the innermost cause: MONAI wraps transform errors ("applying transform ...")
    while root.__cause__ is not None:
        root = root.__cause__
    message = f"{type(root).__name__}: {root}".strip()
    if isinstance(exc, MemoryError) or "can't allocate memory" in message or "out of memory" in message.lower():
        message = "exceeds this machine's memory: " + message
    return {"error": message[:600], "traceback": traceback.format_exc()[-3000:]}


def _run_in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "_case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCHMARK_RESULT "):
            return json.loads(line[len("BENCHMARK_RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}"}


def environment() -> dict:
    import monai
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    if not commit:  # a copy of the tree without .git (e.g. on a lent GPU machine): the caller names the commit
        commit = os.environ.get("BRAINSYNTH_COMMIT", "unknown")
    gpu = {}
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "driver": _nvidia_driver(),
        }
    else:
        device = (
            f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}"
        )
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "device": device,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "machine_memory_gb": round(machine_memory_gb(), 1),
        **gpu,
    }


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "unknown"


def to_markdown(env: dict, rows: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Commit {env['commit']}, {env['device']}, torch {env['torch']}, MONAI {env['monai']}, "
        f"Python {env['python']}, {env['date']}, load average {env.get('load_average_1_5_15min')}"
        + (f", CUDA {env['cuda']}, driver {env['driver']}, {env['gpu_memory_gb']} GB" if "cuda" in env else ""),
        "",
        "| bundle | size | variant | measure | value | peak memory (MB) | settings |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = r["result"]
        if "error" in res:
            measure, value, mem = r["kind"], f"not measured: {res['error'][:160]}", "-"
            if r["kind"] == "train":
                measure += f", {r['stage']} stage"
        elif r["kind"] == "train":
            measure = f"train s/step (median), {r['stage']} stage"
            value = f"{res['seconds_per_step']:.3f} ({res['samples_per_second']:.2f} samples/s)"
            if "cpu_seconds_per_step" in res and res.get("device") == "cpu":
                value += f", CPU {res['cpu_seconds_per_step']:.3f} s"
            if "achieved_tflops" in res:
                value += f", {res['achieved_tflops']:.1f} TFLOP/s"
            if "model_flop_utilisation" in res:
                value += f", MFU {100 * res['model_flop_utilisation']:.1f} %"
            mem = f"{res['peak_memory_mb']:.0f}"
        else:
            measure = f"sample s/{res['unit']}, {res['num_steps']} ({res['network_evaluations']} network calls)"
            value = f"{res['seconds_per_' + res['unit']]:.2f}"
            mem = f"{res['peak_memory_mb']:.0f}"
        # the demo cohort's parameters only say which cached cohort fed the batch; the JSON keeps them
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items() if k != "demo_cohort") or "defaults"
        lines.append(f"| {r['bundle']} | {r['size']} | {r['variant']} | {measure} | {value} | {mem} | {settings} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_case":
        case = json.loads(argv[1])
        if case.get("threads"):
            import torch

            torch.set_num_threads(int(case["threads"]))
        limit_memory(case)
        try:
            result = run_train_case(case) if case["kind"] == "train" else run_sample_case(case)
        except Exception as exc:  # the case's own exception, not the last log line on stderr
            result = case_error(exc)
        print("BENCHMARK_RESULT " + json.dumps(result))
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="all", help=f"one of {', '.join(BUNDLES)}, or all")
    ap.add_argument("--size", choices=("demo", "paper"), default="demo")
    ap.add_argument(
        "--variants", default="baseline", help="comma-separated; parts joined with '+': " + ", ".join(ACCELERATIONS)
    )
    ap.add_argument("--measure", default="train,sample", help="train, sample or both")
    ap.add_argument(
        "--sample-steps",
        default="",
        help="comma-separated SAMPLER:STEPS, e.g. ddpm:250,ddim:50 (default: per bundle, see ci/benchmark_samplers.py)",
    )
    ap.add_argument("--steps", type=int, default=5, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="sampling repeats (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each case (0: torch default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="extra config override")
    ap.add_argument(
        "--data",
        choices=("demo", "real"),
        default="demo",
        help="demo: the simulated cohort at either size; real: the configs' dataset_dir (or --set it)",
    )
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="CPU only: address-space cap of each case (default 85%% of this machine's memory); a case "
        "that needs more is reported as exceeding the machine's memory",
    )
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
            if args.data == "demo" and "demo_cohort" not in overrides:
                # the bundle's own small demo cohort (its pathologies; already cached), padded to the paper grid
                overrides["demo_cohort"] = demo_cohort(bundle)
            base = {
                "bundle": bundle,
                "size": args.size,
                "variant": variant,
                "overrides": overrides,
                "threads": args.threads,
                "count_flops": True,
                "memory_limit_gb": args.memory_limit_gb or round(0.85 * machine_memory_gb(), 1),
            }
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

"""D3M seed study: the paper's deformation (d3m), the working one (x0_deformer) and no deformation (no_mssdm), each
trained with several seeds on the evidence study's data, resumable unit by unit, each unit's results committed.

Usage (from the bundle folder, one torch thread; start one or two processes, they share the work through locks):

    OMP_NUM_THREADS=1 nice -n 10 python scripts/run_seed_study.py --seeds 0 1 2 3 4 >> study.log 2>&1 &

A unit is one seed of either
- ``d3m``: train d3m, evaluate it, evaluate the same model with its deformation off (``d3m_warp_off``), or
- ``no_mssdm+x0_deformer``: train no_mssdm, evaluate it, train x0_deformer's deformer on that frozen denoiser,
  evaluate it, and with its deformation off (``x0_deformer_warp_off``: must equal no_mssdm, the same denoiser).
Its tables (``<method>_per_{slice,volume}.csv``), the diagnostics (``diagnostics_<variant>.jsonl``: mask estimate
and field inside the tumour over training), wall times and ``unit.json`` (seed, commit, commands) land in
``RESULTS/seed<S>/<unit>/``, committed after each evaluation and when the unit ends. A unit whose ``unit.json``
exists is skipped; an interrupted unit restarts after its last finished step (trainings resume from their
checkpoints) while RUN_ROOT survives, from its first step otherwise. Training seeds vary;
the data, split and evaluation noise (seed 0) are the same for every run, so slices pair within and across seeds.
``--report`` (or the last unit) writes the report: scripts/seed_study_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from brainsynth.engine.study import git_commit, timed_step
from brainsynth.engine.training import TrainingLock

BUNDLE = Path(__file__).resolve().parents[1]
REPO = BUNDLE.parents[1]
DEFAULT_RESULTS = REPO / "ci" / "results" / "brats_mri_d3m_cemri_seeds"
#: the evidence study's data and scale (configs/study_cpu.json), unchanged
SCALE = ["configs/demo.json", "configs/study_cpu.json"]
EVAL = ["configs/inference.json", "configs/evaluate.json"]
UNITS = ("no_mssdm+x0_deformer", "d3m")


def _configs(*files: str) -> str:
    return repr(list(files))


def unit_steps(unit: str, seed: int, scale: list[str] = SCALE) -> list[tuple[str, str, str, list[str], str]]:
    """(label, run id, config files, extra arguments, product under the run's bundle_root) of one unit, in order;
    a step whose product exists is done (an interrupted unit restarts after its last finished step)."""
    train, SCALE = ["--seed", str(seed)], scale  # noqa: N806

    def evaluation(method: str, overlays: tuple[str, ...], extra: list[str]) -> tuple:
        label = (
            method.replace("_warp_off", " evaluation, deformation off")
            if "warp_off" in method
            else method + " evaluation"
        )
        return label, "evaluating", _configs(*EVAL, *overlays, *SCALE), extra, f"eval/{method}_per_slice.csv"

    off = ["--sample_with_mssdm", "false", "--eval_method"]
    if unit == "d3m":
        return [
            ("d3m training", "training", _configs("configs/train.json", *SCALE), train, "models/model.pt"),
            evaluation("d3m", (), []),
            evaluation("d3m_warp_off", (), [*off, "d3m_warp_off"]),
        ]
    if unit == "no_mssdm+x0_deformer":
        no, x0 = "configs/no_mssdm.json", "configs/x0_deformer.json"
        return [
            ("no_mssdm training", "training", _configs("configs/train.json", no, *SCALE), train,
             "models/model_no_mssdm.pt"),
            evaluation("no_mssdm", (no,), []),
            ("x0_deformer training (deformer only)", "training", _configs("configs/train.json", x0, *SCALE), train,
             "models/model_x0_deformer.pt"),
            evaluation("x0_deformer", (x0,), []),
            evaluation("x0_deformer_warp_off", (x0,), [*off, "x0_deformer_warp_off"]),
        ]  # fmt: skip
    raise ValueError(f"unknown unit {unit!r}; one of {UNITS}")


def _variants(unit: str) -> list[str]:
    return unit.split("+")


def acquire(lock: Path) -> bool:
    """Atomic per-unit lock (a folder holding the owner's pid); a lock whose process is gone is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.mkdir()
    except FileExistsError:
        owner = lock / "pid"
        if owner.exists() and owner.read_text().strip().isdigit() and TrainingLock._alive(int(owner.read_text())):
            return False
        if not owner.exists() and time.time() - lock.stat().st_mtime < 60:
            return False  # being created right now
    (lock / "pid").write_text(str(os.getpid()))
    return True


def release(lock: Path) -> None:
    (lock / "pid").unlink(missing_ok=True)
    lock.rmdir()


def commit(paths: list[Path], message: str) -> None:
    """Commit only ``paths`` (retrying while another git command holds the index)."""
    if not all(p.resolve().is_relative_to(REPO) for p in paths):
        print(f"not committed (outside {REPO}): {[str(p) for p in paths]}", flush=True)
        return
    rel = [str(p.resolve().relative_to(REPO)) for p in paths]
    for _ in range(30):
        add = subprocess.run(["git", "add", "--", *rel], cwd=REPO, capture_output=True, text=True)
        done = (
            add.returncode == 0
            and (
                subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=REPO, capture_output=True)
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(10)
    print(f"could not commit {rel}; commit them by hand", file=sys.stderr, flush=True)


def collect(unit: str, root: Path, out: Path) -> list[str]:
    """Copy what the unit's steps have produced so far (tables, diagnostics) from the run folder into the results;
    returns the methods with tables."""
    for variant in _variants(unit):
        diagnostics = root / "runs" / variant / "tensorboard" / "diagnostics.jsonl"
        if diagnostics.exists():
            (out / f"diagnostics_{variant}.jsonl").write_text(diagnostics.read_text())
    methods = []
    for method in _variants(unit) + [f"{v}_warp_off" for v in _variants(unit) if v != "no_mssdm"]:
        if (root / "eval" / f"{method}_per_slice.csv").exists():
            methods.append(method)
            for table in ("slice", "volume"):
                name = f"{method}_per_{table}.csv"
                (out / name).write_text((root / "eval" / name).read_text())
    return methods


def run_unit(unit: str, seed: int, run_root: Path, results: Path, scale: list[str] = SCALE, threads: int = 1) -> None:
    """Run the unit's steps not done yet; each evaluation's tables are committed as they land (the unit's report
    entry is marked partial until ``unit.json`` is written at the end)."""
    root = run_root / f"seed{seed}"
    out = results / f"seed{seed}" / unit.replace("+", "_and_")
    out.mkdir(parents=True, exist_ok=True)
    commands = []
    for label, run_id, configs, extra, product in unit_steps(unit, seed, scale):
        args = ["--cache_dir", str(run_root / "cache"), "--num_threads", str(threads), *extra]
        commands.append(f"python -m monai.bundle run {run_id} --bundle_root {root} --config_file \"{configs}\" "
                        + " ".join(args))  # fmt: skip
        if (root / product).exists():
            print(f"seed {seed}: {label}: done earlier ({root / product})", flush=True)
            continue
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = timed_step(str(root), label, run_id, configs, *args)
        timing = stderr.getvalue().strip()
        print(f"seed {seed}: {timing}", flush=True)
        with open(out / "wall_times.txt", "a") as f:
            f.write(timing + "\n")
        if status:
            raise RuntimeError(f"seed {seed}, {label}: exit status {status} (see the log above)")
        if run_id == "evaluating":
            collect(unit, root, out)
            commit([out], f"D3M seed study: seed {seed}, {label} (partial unit)")
    methods = collect(unit, root, out)
    record = {"seed": seed, "unit": unit, "methods": methods, "commit": git_commit(BUNDLE), "commands": commands,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    (out / "unit.json").write_text(json.dumps(record, indent=1) + "\n")  # last: its presence marks the unit done
    commit([out], f"D3M seed study: seed {seed}, {unit} (results)")


def pending(seeds: list[int], results: Path) -> list[tuple[int, str]]:
    """Units without results, seed by seed, so the first seeds complete first."""
    return [
        (s, u)
        for s in seeds
        for u in UNITS
        if not (results / f"seed{s}" / u.replace("+", "_and_") / "unit.json").exists()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--run_root", type=Path, default=Path("/work/runs/d3m_seed_study"),
                        help="trained models and checkpoints (not committed)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="committed tables (in the repository)")
    parser.add_argument("--scale", nargs="+", default=SCALE, help="overlays after train/inference (default: the "
                        "evidence study's data and size; a smaller one for a smoke test)")  # fmt: skip
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--report", action="store_true", help="only write the report from the results so far")
    args = parser.parse_args()
    os.chdir(BUNDLE)
    results = args.results.resolve()
    while not args.report:
        todo = pending(args.seeds, results)
        if not todo:
            break
        for seed, unit in todo:
            lock = args.run_root / "locks" / f"seed{seed}_{unit}"
            if acquire(lock):
                try:
                    run_unit(unit, seed, args.run_root, results, args.scale, args.num_threads)
                finally:
                    release(lock)
                break
        else:
            time.sleep(60)  # every remaining unit is being run by another process
    report = [sys.executable, "scripts/seed_study_report.py", str(results), "--overwrite"]
    if subprocess.call(report) == 0:
        commit([results / "study"], "D3M seed study: report")


if __name__ == "__main__":
    main()

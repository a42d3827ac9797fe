"""What every study result records beside its numbers: the command, the code's commit, the machine, versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def git_commit(folder: str | os.PathLike | None = None) -> str:
    """The checkout's commit (with ``+dirty`` when tracked files differ), or ``unknown`` outside git."""
    cwd = str(folder or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def run_context() -> dict[str, Any]:
    """Command line, commit, machine and package versions of the running process."""
    import monai
    import torch

    argv = list(sys.argv)
    if argv and argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        argv[0:1] = ["python", "-m", "monai.bundle"]  # how the user typed it
    elif argv and argv[0].endswith(".py"):
        argv.insert(0, "python")
    return {
        "command": " ".join(argv),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__},
    }


def timed_step(bundle_root: str, label: str, run_id: str, config_file: str, *extra: str) -> int:
    """One step of a bundle's study script: ``python -m monai.bundle run RUN_ID`` in the current folder (the bundle's),
    writing into ``bundle_root``, then ``LABEL: W s wall, U s user CPU, M KB max RSS`` on stderr (the line the study
    results quote). Returns the step's exit status."""
    import resource

    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--bundle_root", bundle_root]
    command += ["--logging_file", "configs/logging.conf", "--config_file", config_file, *extra]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    status = subprocess.call(command)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"{label}: {time.perf_counter() - start:.2f} s wall, {after.ru_utime - before.ru_utime:.2f} s user CPU, "
        f"{after.ru_maxrss} KB max RSS",
        file=sys.stderr,
        flush=True,
    )
    return status


def shell_preamble(output_dir: str, *overlays: str) -> str:
    """The shell lines every bundle's ``scripts/run_study.sh`` starts with (one copy, here): ``out`` (the run
    folder), ``overlays`` (the user's config overlays, appended to every step's config list) and
    ``run LABEL RUN_ID CONFIGS [ARGS ...]`` (one ``timed_step``). A script takes them with
    ``steps=$(python -m brainsynth.engine.study preamble "$@"); eval "$steps"``."""
    import shlex

    joined = "".join(f",'{f}'" for f in overlays)
    return "\n".join(
        [
            f"out={shlex.quote(output_dir)}",
            f"overlays={shlex.quote(joined)}",
            'run() { python -m brainsynth.engine.study step "$out" "$1" "$2" "[$3$overlays]" "${@:4}"; }',
        ]
    )


USAGE = (
    "usage: python -m brainsynth.engine.study step OUT LABEL RUN_ID CONFIG_FILE [EXTRA ...]\n"
    "       python -m brainsynth.engine.study preamble OUTPUT_DIR [CONFIG_OVERLAY ...]   (for scripts/run_study.sh)"
)

if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "step":
        sys.exit(timed_step(*sys.argv[2:]))
    if len(sys.argv) >= 3 and sys.argv[1] == "preamble":
        print(shell_preamble(*sys.argv[2:]))
        sys.exit(0)
    sys.exit(
        USAGE if sys.argv[1:2] != ["preamble"] else "scripts/run_study.sh: give the output directory first\n" + USAGE
    )


def report_main(write_report: Any, markdown: Any, description: str, folder: str = "results") -> None:
    """Command line of a study report script: FOLDER (the study's results), ``--out`` (default FOLDER/study),
    ``--overwrite``; writes the report with ``write_report(folder, out, overwrite)`` and prints ``markdown`` of it."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(folder, type=Path)
    parser.add_argument("--out", type=Path, default=None, help=f"default {folder.upper()}/study")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    results = getattr(args, folder)
    print(markdown(write_report(results, args.out or results / "study", args.overwrite)))

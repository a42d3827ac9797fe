"""The tests' preforked runner (tests/preforked_runner.py) gives what a real ``python -m monai.bundle`` gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import preforked_runner

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_med_ddpm"


def test_forked_and_real_runs_fail_alike_on_an_unknown_key():
    cmd = preforked_runner.bundle_command("training", ["configs/train.json", "configs/demo.json"], "--no_such_key", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    forked = preforked_runner.run(cmd, BUNDLE, env)
    real = subprocess.run(cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert forked.returncode == real.returncode != 0
    last = [p.stderr.strip().splitlines()[-1] for p in (forked, real)]
    assert last[0] == last[1] and "--no_such_key" in last[0]


def test_another_interpreter_or_python_path_runs_as_a_real_process(tmp_path):
    probe = [sys.executable, "-c", "import os; print(os.getpid())"]
    first, second = (preforked_runner.run(probe, tmp_path).stdout.split()[0] for _ in range(2))
    assert first != second  # two processes, neither of them the server
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "monai.bundle", "--help"]
    assert not preforked_runner._same_startup(env) and preforked_runner._same_startup(dict(os.environ))
    assert preforked_runner.run(cmd, tmp_path, env).returncode == 0

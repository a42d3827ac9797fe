"""The GPU check (ci/gpu_check.sh -> ci/gpu_check.py): its plan covers every user path, it exits non-zero on any
failure, and its CPU mode (the same list at the tiny size, gloo) passes, so it cannot rot between the rare moments
a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

import benchmark  # noqa: E402
import gpu_check  # noqa: E402


def _check(tmp_path, *args, timeout=3000):
    return subprocess.run(
        ["bash", str(REPO / "ci" / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_failing_step_makes_the_check_exit_non_zero(tmp_path):
    """A bad override (a key no config has) fails the first training run, and so the whole check."""
    proc = _check(tmp_path, "--only", "brats_mri_med_ddpm/train", "--override", "no_such_key=1", timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("gpu_check_cpu_*.json")]
    assert not report["ok"] and [s["name"] for s in report["steps"]] == ["brats_mri_med_ddpm/train/train.json"]
    assert "no_such_key" in report["steps"][0]["problem"]
    assert "1 of 1 steps failed" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # 13 minutes on a shared 2-core CPU (ci/results/gpu_check/README.md): every bundle's runs
def test_cpu_mode_runs_every_step_and_exits_zero(tmp_path):
    proc = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("gpu_check_cpu_*.json")]
    names = [s["name"] for s in report["steps"]]
    assert names == [s["name"] for s in gpu_check.plan("cpu", tmp_path, [])]
    assert report["ok"] and all(s["ok"] for s in report["steps"])


def test_plan_runs_every_stage_sampler_evaluate_and_multi_gpu_overlay(tmp_path):
    steps = gpu_check.plan("cuda", tmp_path, [])
    names = [s["name"] for s in steps]
    for bundle, spec in gpu_check.BUNDLES.items():
        configs = REPO / "bundles" / bundle / "configs"
        overlays = sorted(p.name for p in configs.glob("multi_gpu_*.json"))
        assert sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith(f"{bundle}/torchrun/")) == overlays
        for sampler in spec["samplers"]:
            (step,) = [s for s in steps if s["name"] == f"{bundle}/inference/{sampler}"]
            assert step["checks"]["volumes"][1] >= 2  # every sampler makes two volumes at least
        assert f"{bundle}/evaluate" in names
        trains = [s for s in steps if s["name"].startswith(f"{bundle}/train/")]
        assert len(trains) == len(spec["weights"]) and all(s["checks"]["weights"] for s in trains)
        size = trains[0]["size"]
        assert size["amp"] is True and all(size[k] == 1 for k in spec["every_iteration"])
    # torchrun with one process per overlay, on every bundle
    assert all("--nproc_per_node" in s["cmd"] for s in steps if "/torchrun/" in s["name"])
    assert names[-1] == "compare/cpu_vs_cuda"
    # every sampler of the Med-DDPM bundle (its sampler key's choices)
    assert gpu_check.BUNDLES["brats_mri_med_ddpm"]["samplers"] == ["ddpm", "ddim", "dpmpp", "unipc"]


def test_timing_cases_are_paper_size_memory_goal_first():
    cases = gpu_check.timing_plan()
    assert all(c["size"] == "paper" for c in cases)
    assert cases[0]["bundle"] == "brats_mri_med_ddpm" and cases[0]["variant"] == "bf16+checkpointing+compile"
    assert any(c.get("num_steps") == "volume:50" and c["bundle"] == "brats_mri_d3m_cemri" for c in cases)


def test_gpu_mode_refuses_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(
        [sys.executable, str(REPO / "ci" / "gpu_check.py")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr.strip().splitlines()[-1]


def test_case_error_keeps_the_real_exception():
    try:
        raise KeyError("config key 'batch_size' not defined")
    except KeyError as exc:
        err = benchmark.case_error(exc)
    assert err["error"].startswith("KeyError: ") and "batch_size" in err["error"]
    assert "Traceback" in err["traceback"]
    err = benchmark.case_error(MemoryError("can't allocate memory"))
    assert err["error"].startswith("exceeds this machine's memory")

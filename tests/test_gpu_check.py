"""The prepared GPU check (ci/gpu_check.sh -> ci/gpu_check.py) in its tiny CPU mode, so it cannot rot between the
rare moments a GPU is available: every planned case runs and is measured, and the reports hold every case; a failing
case records its own exception, not the last log line."""

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


@pytest.mark.slow  # two minutes; tests/test_every_config.py runs the benchmark harness tiny in the default suite
def test_tiny_mode_measures_every_case(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "ci" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report_path,) = tmp_path.glob("gpu_check_tiny_*.json")
    report = json.loads(report_path.read_text())
    planned = gpu_check.plan(tiny=True)
    assert len(report["rows"]) == len(planned)
    # every bundle's every training stage and every bundle's sampler is in the plan
    assert {(c["bundle"], c.get("stage")) for c in planned if c["kind"] == "train"} == set(gpu_check.STAGES)
    assert {c["bundle"] for c in planned if c["kind"] == "sample"} == set(gpu_check.SAMPLERS)
    for row in report["rows"]:
        result = row["result"]
        assert "error" not in result, (row["bundle"], row["kind"], result.get("error"), result.get("traceback"))
        if row["kind"] == "train":
            assert result["seconds_per_step"] > 0 and result["peak_memory_mb"] > 0
            assert result["samples_per_second"] == result["batch_size"] / result["seconds_per_step"]
            assert result["flops_per_step"] > 0  # counted on an extra, untimed step
        else:
            seconds = next(v for k, v in result.items() if k.startswith("seconds_per_"))
            assert seconds > 0 and result["network_evaluations"] >= 2
    markdown = next(tmp_path.glob("gpu_check_tiny_*.md")).read_text()
    assert markdown.count("\n| ") == len(planned) + 1  # header + one row per case
    assert report["environment"]["commit"] and report["environment"]["torch"]


def test_gpu_mode_refuses_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(
        [sys.executable, str(REPO / "ci" / "gpu_check.py")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr.strip().splitlines()[-1]


def test_gpu_plan_covers_recipes_and_orders_compile_last():
    cases = gpu_check.plan(tiny=False)
    train = [c for c in cases if c["kind"] == "train"]
    for stage in gpu_check.STAGES:
        variants = {c["variant"] for c in train if (c["bundle"], c["stage"]) == stage}
        assert {"fp32", "bf16", "bf16+checkpointing", "bf16+compile"} <= variants, (stage, variants)
    first_compile = min(i for i, c in enumerate(cases) if c["overrides"].get("compile"))
    assert all(not c["overrides"].get("compile") for c in cases[:first_compile])
    assert all(c["size"] == "paper" for c in cases)


def test_case_error_keeps_the_real_exception():
    try:
        raise KeyError("config key 'batch_size' not defined")
    except KeyError as exc:
        err = benchmark.case_error(exc)
    assert err["error"].startswith("KeyError: ") and "batch_size" in err["error"]
    assert "Traceback" in err["traceback"]
    err = benchmark.case_error(MemoryError("can't allocate memory"))
    assert err["error"].startswith("exceeds this machine's memory")


def test_a_failing_case_reports_its_exception_not_a_log_line():
    case = {
        "bundle": "brats_mri_med_ddpm",
        "size": "demo",
        "variant": "x",
        "kind": "train",
        "stage": "diffusion",
        "overrides": {"no_such_key": 1, "dataset_dir": "demo"},
        "threads": 1,
        "steps": 1,
        "warmup": 0,
    }
    result = benchmark._run_in_subprocess(case, 300)
    assert "no_such_key" in result["error"] and result["error"].startswith("KeyError")

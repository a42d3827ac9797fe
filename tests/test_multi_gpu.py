"""Every train config's multi-GPU overlay, run the documented way on CPU: ``torchrun --standalone
--nproc_per_node=2 -m monai.bundle run ...`` with the gloo backend, two processes, two iterations.

An engine probe (installed through sitecustomize, see ci/verify_bundles.py) records in each process its rank,
the trainer's iterations and losses, a checksum of the trained weights and every torch.save call."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ci"))

import verify_bundles as vb  # noqa: E402

ITERATIONS = 2
# every train config's overlay; by default only each bundle's first stage (later stages build on an earlier one
# and take minutes on a shared 2-core CPU: -m slow)
CASES = [
    pytest.param(b, t, id=f"{b.name}-{t}", marks=[pytest.mark.slow] if i else [])
    for b in vb.discover_bundles()
    for i, t in enumerate(vb.classify_configs(b).train)
]


@pytest.mark.parametrize("bundle_dir, train_name", CASES)
def test_ddp_on_cpu_two_processes(bundle_dir, train_name, tmp_path):
    configs = vb.classify_configs(bundle_dir)
    overlay = vb.multi_gpu_overlay(configs, train_name)
    assert overlay, f"{bundle_dir.name}: {train_name} has no multi-GPU overlay"
    scratch = vb.scratch_copy(bundle_dir, tmp_path / "scratch")
    # stages this one builds on (e.g. the autoencoder under the diffusion stage) train first, single process
    stack = vb.config_stack(bundle_dir, train_name, configs.train)
    for i in range(1, len(stack)):
        r = vb.run_workflow(scratch, stack[:i] + configs.demo[:1], "train", max_iterations=1)
        assert r["returncode"] == 0, r["output"][-3000:]
    before = {p for p in scratch.rglob("*") if p.is_file()}

    stack = stack + configs.demo[:1] + [overlay]  # the overlay goes last so the demo cannot undo DDP
    reports = tmp_path / "reports"
    reports.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        *vb.bundle_run_args(scratch, stack, "train"),
        "--bundle_root",
        str(scratch),
    ]
    proc = subprocess.run(
        cmd, cwd=scratch, capture_output=True, text=True, timeout=600, env=vb.probe_environment(reports, ITERATIONS)
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    ranks = {r["rank"]: r for r in vb.read_probe_reports(reports)}
    assert sorted(ranks) == [0, 1], f"probe reports from ranks {sorted(ranks)}"
    trained = {}
    for rank, report in ranks.items():
        assert report["world_size"] == 2
        trainers = [e for e in report["engines"] if e["trains"]]
        assert trainers, f"rank {rank} ran no trainer: {report['engines']}"
        t = trainers[-1]
        assert t["iterations"] == ITERATIONS, f"rank {rank} trained {t['iterations']} iterations"
        assert t["losses"] and all(math.isfinite(x) for x in t["losses"]), t["losses"]
        trained[rank] = t
    # gradients were averaged across the two processes: both hold bit-identical weights afterwards
    assert trained[0]["weights_checksum"] == trained[1]["weights_checksum"]
    # each rank saw its own shard of the data (DistributedSampler), so their losses differ
    assert trained[0]["losses"] != trained[1]["losses"], "both ranks computed identical losses: same data?"
    # checkpoints and logs from rank 0 only
    assert ranks[1]["saves"] == [], f"rank 1 wrote {ranks[1]['saves']}"
    assert any("checkpoint" in s for s in ranks[0]["saves"]), ranks[0]["saves"]  # atomic: a temporary name
    new = [p for p in scratch.rglob("*") if p.is_file() and p not in before]
    checkpoints = [p for p in new if p.name.startswith("checkpoint") and p.suffix == ".pt"]
    assert len(checkpoints) == 1, checkpoints
    # a TensorBoard handler built on every rank opens an (empty) event file there; only rank 0 may log into one
    logged = [p.parent for p in new if p.name.startswith("events.out.tfevents") and _has_summaries(p)]
    assert logged, "no TensorBoard scalars were written"
    assert len(logged) == len(set(logged)), f"more than one process logged to TensorBoard: {logged}"


def _has_summaries(event_file: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return any(event.summary.value for event in EventFileLoader(str(event_file)).Load())


def test_ldm_stage_overlays_train_under_two_gloo_processes(tiny_trained, tmp_path):
    """The conditional LDM's two multi-GPU overlays by name, at the tiny settings on two gloo processes:
    ``multi_gpu_train_autoencoder.json`` trains stage 1, then ``multi_gpu_train_diffusion.json`` trains stage 2 on
    the autoencoder stage 1 just wrote. In each stage both ranks train their iterations on their own data and end
    with bit-identical weights, and only rank 0 writes."""
    from tiny_bundles import BUNDLES, runner_command

    bundle = "brain_mri_conditional_ldm"
    _, overlay = tiny_trained(bundle)  # the tiny settings (its cohort cache too); the weights are trained here
    root = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    stages = [
        (["train_autoencoder.json"], "multi_gpu_train_autoencoder.json", "model_autoencoder.pt"),
        (["train_autoencoder.json", "train_diffusion.json"], "multi_gpu_train_diffusion.json", "model.pt"),
    ]
    for configs, multi_gpu, weights in stages:
        reports = tmp_path / multi_gpu
        reports.mkdir()
        cmd = runner_command(bundle, "training", configs, overlay, root, extra=[multi_gpu], launcher=launcher)
        env = {**vb.probe_environment(reports, ITERATIONS), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, cwd=BUNDLES / bundle, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        ranks = {r["rank"]: r for r in vb.read_probe_reports(reports)}
        assert sorted(ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks.values()), multi_gpu
        trained = {k: [e for e in r["engines"] if e["trains"]][-1] for k, r in ranks.items()}
        assert all(t["iterations"] == ITERATIONS for t in trained.values()), (multi_gpu, trained)
        assert trained[0]["weights_checksum"] == trained[1]["weights_checksum"], f"{multi_gpu}: weights differ"
        assert trained[0]["losses"] != trained[1]["losses"], f"{multi_gpu}: both ranks saw the same data"
        assert ranks[1]["saves"] == [], f"{multi_gpu}: rank 1 wrote {ranks[1]['saves']}"
        assert (root / "models" / weights).is_file(), f"{multi_gpu}: no {weights}"

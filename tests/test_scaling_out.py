"""Scaling out with torchrun: sharded, resumable generation (``multi_gpu_inference`` overlays) and multi-node
training, on CPU with gloo.

Default suite: the sharding library, and Med-DDPM's sharded generation with 1 and 2 ranks (byte-identical volumes,
complete manifest) interrupted and restarted. Opt-in (``-m slow``): the same for D3M and the LDM, and two "nodes"
as two torchrun launches on the loopback interface (c10d rendezvous) training and generating.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_bundles import BUNDLES, run, runner_command, runner_env

from brainsynth.engine.sharding import MANIFEST_NAME, ShardedGeneration, item_seed, shard

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


# --- the library ---------------------------------------------------------------------------------------------
def test_shards_are_disjoint_complete_and_independent_of_input_order():
    items = [{"id": f"s{i:02d}"} for i in range(7)]
    for world in (1, 2, 3):
        shards = [shard(items, "id", r, world) for r in range(world)]
        ids = [i["id"] for s in shards for i in s]
        assert sorted(ids) == [i["id"] for i in items] and len(ids) == len(set(ids))
        assert shards == [shard(list(reversed(items)), "id", r, world) for r in range(world)]
    with pytest.raises(ValueError, match="repeated 'id': s01"):
        shard(items + [{"id": "s01"}], "id", 0, 2)


def test_item_seed_depends_on_run_seed_and_item_only():
    assert item_seed(0, "a") == item_seed(0, "a")
    assert len({item_seed(0, "a"), item_seed(1, "a"), item_seed(0, "b")}) == 3
    assert 0 <= item_seed(123, "x") < 2**31


def _files(out: Path):
    return lambda item: [out / f"{item['id']}.nii.gz", out / f"{item['id']}.json"]


def test_resume_skips_complete_items_and_remakes_interrupted_ones(tmp_path):
    items = [{"id": n} for n in ("a", "b", "c")]
    for name in ("a.nii.gz", "a.json", "b.nii.gz"):  # a complete, b interrupted, c not started
        (tmp_path / name).write_text(name)
    run_ = ShardedGeneration(items, "id", _files(tmp_path), tmp_path, seed=3)
    assert run_.complete == ["a"] and [i["id"] for i in run_.pending] == ["b", "c"]
    assert (tmp_path / "a.nii.gz").read_text() == "a.nii.gz"  # never touched
    assert not (tmp_path / "b.nii.gz").exists()  # the partial item's file is removed, to be written again
    with pytest.raises(RuntimeError, match="4 expected output"):
        run_.finish()  # b and c were not generated: the manifest says so and the run fails
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and len(manifest["missing"]) == 4
    for name in ("b", "c"):
        (tmp_path / f"{name}.nii.gz").write_text(name)
        (tmp_path / f"{name}.json").write_text(name)
    run_.finish()
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    assert [(i["id"], i["produced_by"], i["seed"]) for i in manifest["items"]] == [
        ("a", "existing", item_seed(3, "a")),
        ("b", 0, item_seed(3, "b")),
        ("c", 0, item_seed(3, "c")),
    ]
    assert manifest["items"][0]["files"][0] == {
        "path": "a.nii.gz",
        "bytes": len(b"a.nii.gz"),
        "sha256": hashlib.sha256(b"a.nii.gz").hexdigest(),
    }


# --- sharded generation through MONAI's runner ------------------------------------------------------------------
def _generate(bundle, overlay, root, out, ranks, *args):
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else ()
    return run(
        bundle,
        "inference",
        TINY_INFERENCE[bundle],
        overlay,
        root,
        "--output_dir",
        out,
        *args,
        extra=["multi_gpu_inference.json"],
        launcher=launcher,
    )


TINY_INFERENCE = {
    "brats_mri_med_ddpm": ["train.json", "inference.json"],
    "brats_mri_d3m_cemri": ["inference.json"],
    "brain_mri_conditional_ldm": ["inference.json"],
}
#: arguments that give each bundle several items to share out
ITEMS = {
    "brats_mri_med_ddpm": ["--split", "all"],
    "brats_mri_d3m_cemri": ["--split", "all"],
    "brain_mri_conditional_ldm": ["--grid", "true"],
}


def _volumes(folder: Path) -> dict[str, bytes]:
    """Every output file except the provenance sidecars (they record the time of writing) and the manifest."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".json"
    }


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def _check_sharded(bundle, tiny_trained, tmp_path):
    root, overlay = tiny_trained(bundle)
    one, two = tmp_path / "one", tmp_path / "two"
    _generate(bundle, overlay, root, one, 1, *ITEMS[bundle])
    _generate(bundle, overlay, root, two, 2, *ITEMS[bundle])
    volumes = _volumes(one)
    assert len(volumes) >= 4 and volumes == _volumes(two), "1 and 2 ranks wrote different volumes"
    m1, m2 = _manifest(one), _manifest(two)
    assert m1["complete"] and m2["complete"] and m2["world_size"] == 2
    assert {i["produced_by"] for i in m2["items"]} == {0, 1}, "both ranks generate"
    listed = {f["path"] for i in m2["items"] for f in i["files"]}
    assert listed == {str(p.relative_to(two)) for p in two.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    assert [(i["id"], i["seed"]) for i in m1["items"]] == [(i["id"], i["seed"]) for i in m2["items"]]
    return two, m2


def test_med_ddpm_sharded_generation_matches_one_rank_and_resumes(tiny_trained, tmp_path):
    bundle = "brats_mri_med_ddpm"
    out, manifest = _check_sharded(bundle, tiny_trained, tmp_path)
    items = manifest["items"]
    complete_volumes = _volumes(out)
    # interrupt: one item lost a file, another lost everything; the rest must not be rewritten
    damaged, lost = items[0], items[1]
    (out / damaged["files"][2]["path"]).unlink()
    for f in lost["files"]:
        (out / f["path"]).unlink()
    untouched = {f["path"]: (out / f["path"]).stat().st_mtime_ns for i in items[2:] for f in i["files"]}
    before = _volumes(out)
    root, overlay = tiny_trained(bundle)
    proc = _generate(bundle, overlay, root, out, 2, *ITEMS[bundle])
    assert "an interrupted run" in proc.stdout + proc.stderr
    assert {p: (out / p).stat().st_mtime_ns for p in untouched} == untouched, "a complete item was rewritten"
    after = _manifest(out)
    assert after["complete"]
    produced = {i["id"]: i["produced_by"] for i in after["items"]}
    assert produced[damaged["id"]] in (0, 1) and produced[lost["id"]] in (0, 1)
    assert all(produced[i["id"]] == "existing" for i in items[2:])
    assert set(_volumes(out)) >= set(before)
    assert _volumes(out) == complete_volumes, "the regenerated items differ from the volumes they replace"
    # the remade items are the same bytes as before the damage (per-item seeds)
    assert [f["sha256"] for f in after["items"][1]["files"] if not f["path"].endswith(".json")] == [
        f["sha256"] for f in lost["files"] if not f["path"].endswith(".json")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["brats_mri_d3m_cemri", "brain_mri_conditional_ldm"])
def test_sharded_generation_matches_one_rank(bundle, tiny_trained, tmp_path):
    _check_sharded(bundle, tiny_trained, tmp_path)


# --- two nodes on one machine -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(bundle: str, run_id: str, configs: list[str], overlay: Path, root: Path, *args, extra=(), env=None):
    """Two torchrun launches (two 'nodes', two processes each) meeting over loopback with c10d rendezvous."""
    endpoint = f"127.0.0.1:{_free_port()}"
    launcher = [
        *TORCHRUN,
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=brainsynth-test",
    ]
    cmd = runner_command(bundle, run_id, configs, overlay, root, *args, extra=extra, launcher=launcher)
    environment = {**runner_env(), "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    nodes = [
        subprocess.Popen(
            cmd, cwd=BUNDLES / bundle, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [n.communicate(timeout=900)[0] for n in nodes]
    for n, text in zip(nodes, outputs):
        assert n.returncode == 0, text[-5000:]
    return outputs


@pytest.mark.slow
def test_two_nodes_train_to_identical_weights_and_share_generation(tiny_trained, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ci"))
    import verify_bundles as vb

    bundle = "brats_mri_med_ddpm"
    trained_root, overlay = tiny_trained(bundle)
    root = tmp_path / "multinode"
    reports = tmp_path / "reports"
    reports.mkdir()
    _two_nodes(
        bundle,
        "training",
        ["train.json"],
        overlay,
        root,
        extra=["multi_gpu_train.json"],
        env=vb.probe_environment(reports, 2),
    )
    ranks = {r["rank"]: r for r in vb.read_probe_reports(reports)}
    assert sorted(ranks) == [0, 1, 2, 3] and all(r["world_size"] == 4 for r in ranks.values())
    checksums = {[e for e in r["engines"] if e["trains"]][-1]["weights_checksum"] for r in ranks.values()}
    assert len(checksums) == 1, "the four processes of the two nodes ended with different weights"
    assert all(r["saves"] == [] for k, r in ranks.items() if k), "a rank other than 0 wrote a file"
    assert (root / "models" / "model.pt").is_file()

    # sharded generation over both nodes equals one process
    one, four = tmp_path / "one", tmp_path / "four"
    _generate(bundle, overlay, trained_root, one, 1, *ITEMS[bundle])
    _two_nodes(
        bundle,
        "inference",
        TINY_INFERENCE[bundle],
        overlay,
        trained_root,
        "--output_dir",
        four,
        *ITEMS[bundle],
        extra=["multi_gpu_inference.json"],
    )
    assert _volumes(one) == _volumes(four)
    manifest = _manifest(four)
    assert manifest["complete"] and manifest["world_size"] == 4
    assert {i["produced_by"] for i in manifest["items"]} == {0, 1, 2, 3}

"""Same seed, same scan (issue 34): in every bundle a volume depends on the run seed and its item id alone.

Through MONAI's runner with the session's tiny weights, each bundle generates the same items three ways: a plain
run with batch size 1, a plain run with batch size 2 (D3M: slices sampled together), and the ``multi_gpu_inference``
overlay on two gloo ranks. Every written file except the provenance sidecars (they record the time of writing) and
the manifest is byte-identical across the three. Med-DDPM samples with DDIM at eta 1, so its per-step noise is
drawn too. Med-DDPM and D3M read a datalist of BraTS 2021-named files, whose outputs keep that naming (``_t1ce``):
the one naming rule of every bundle (``brainsynth.data.output_layout_of``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_bundles import TINY, run

from brainsynth.engine.sharding import MANIFEST_NAME

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

#: per bundle: the items to generate and the settings every run of the test shares
ARGS = {
    "brats_mri_med_ddpm": ["--split", "all", "--ddim_eta", "1.0", "--preview", "False"],
    "brats_mri_d3m_cemri": ["--split", "all"],
    "brain_mri_conditional_ldm": [
        "--combinations",
        "[['glioblastoma', 't1w'], ['healthy', 'flair'], ['dementia', 't2w']]",
        "--num_samples",
        "2",
        "--montage",
        "False",
    ],
}


def brats2021_datalist(tmp_path: Path, bundle: str) -> Path:
    """A datalist (JSON, outside the data folder) listing a BraTS 2021-named folder's files: rows whose dataset
    layout says nothing about file naming (``datalist``)."""
    from bundle_code import brats2021_folder

    from brainsynth.data import discover

    folder = brats2021_folder(tmp_path, {**TINY[bundle]["overlay"]["demo_cohort"], "n_subjects": 3})
    rows = []
    for row in discover(folder):
        rows.append({k: v for k, v in row.items() if k not in ("layout", "label_convention", "split", "pathology")})
    path = tmp_path / "my_list.json"
    path.write_text(json.dumps({"label_convention": "brats2021", "test": rows}))
    return path


def _outputs(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".json"  # provenance sidecars (time of writing) and the manifest
    }


@pytest.mark.parametrize("bundle", list(ARGS))
def test_plain_batched_and_sharded_runs_write_identical_volumes(bundle, tiny_trained, tmp_path):
    root, overlay = tiny_trained(bundle)
    args = list(ARGS[bundle])
    if bundle != "brain_mri_conditional_ldm":
        args += ["--dataset_dir", str(brats2021_datalist(tmp_path, bundle))]
    outs = {}
    for name, batch, ranks in (("plain_b1", 1, 1), ("plain_b2", 2, 1), ("ranks2_b2", 2, 2)):
        out = outs[name] = tmp_path / name
        extra = ["multi_gpu_inference.json"] if ranks > 1 else []
        launcher = TORCHRUN if ranks > 1 else ()
        cli = [*args, "--output_dir", str(out), "--batch_size", str(batch)]
        run(bundle, "inference", TINY[bundle]["inference"], overlay, root, *cli, extra=extra, launcher=launcher)
    reference = _outputs(outs["plain_b1"])
    volumes = [n for n in reference if n.endswith(".nii.gz")]
    assert len(volumes) >= 3, reference.keys()
    for name in ("plain_b2", "ranks2_b2"):
        written = _outputs(outs[name])
        assert written.keys() == reference.keys(), f"{name} wrote other files"
        differ = [n for n in reference if written[n] != reference[n]]
        assert not differ, (
            f"{name}: {len(differ)} of {len(reference)} files differ from plain batch 1, e.g. {differ[0]}"
        )
    manifest = json.loads((outs["ranks2_b2"] / MANIFEST_NAME).read_text())
    assert manifest["complete"] and {i["produced_by"] for i in manifest["items"]} == {0, 1}, "both ranks generate"
    if bundle != "brain_mri_conditional_ldm":  # named like the datalist's files (BraTS 2021), never 2023's
        assert sum(n.endswith("_t1ce.nii.gz") for n in volumes) == 3, volumes
        brats2023 = ("-t1n.nii.gz", "-t1c.nii.gz", "-t2w.nii.gz", "-t2f.nii.gz", "-seg.nii.gz")
        assert not [n for n in volumes if n.endswith(brats2023)], volumes

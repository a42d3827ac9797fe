"""Discovery: every supported layout, written on disk, must come back as the same canonical data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainsynth.conventions import BRATS_MODALITIES, LAYOUT_SUFFIXES, MSD_CHANNELS, label_convention
from brainsynth.data import (
    DatasetError,
    LoadSubjectd,
    discover,
    expand_scans,
    read_datalist,
    remap_labels,
    resolve_dataset_dir,
    split_items,
)

SHAPE = (6, 5, 4)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1.2, 0, 20], [0, 0, 1.5, -5], [0, 0, 0, 1]])
# a canonical segmentation using every tumour label, 0 bg, 1 core, 2 edema, 3 enhancing
CANONICAL_SEG = np.zeros(SHAPE, np.uint8)
CANONICAL_SEG[1:3, 1:3, 1:3] = 2
CANONICAL_SEG[2, 2, 2] = 1
CANONICAL_SEG[1, 1, 1] = 3


def _images(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.random(SHAPE).astype(np.float32) + i for i, m in enumerate(BRATS_MODALITIES)}


def _to_convention(seg: np.ndarray, convention: str) -> np.ndarray:
    """Encode canonical labels in a source convention (first source value of each canonical label)."""
    out = np.zeros_like(seg)
    inverse = {}
    for src, dst in sorted(label_convention(convention).to_canonical.items()):
        inverse.setdefault(dst, src)
    for dst, src in inverse.items():
        out[seg == dst] = src
    return out


def _save(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return str(path)


SUBJECTS = {"s0": 0, "s1": 1}


def write_layout(root: Path, layout: str) -> Path:
    """Write SUBJECTS in ``layout``; return the path to hand to discover()."""
    for name, seed in SUBJECTS.items():
        images = _images(seed)
        if layout in ("brats2021", "brats2023", "peds"):
            sub = {
                "brats2021": f"BraTS2021_0000{seed}",
                "brats2023": f"BraTS-GLI-0000{seed}-000",
                "peds": f"BraTS-PED-0000{seed}-000",
            }[layout]
            suffixes = LAYOUT_SUFFIXES["brats2021" if layout == "brats2021" else "brats2023"]
            convention = {"brats2021": "brats2021", "brats2023": "brats2023", "peds": "peds2024"}[layout]
            for m, img in images.items():
                _save(img, root / sub / f"{sub}{'_' if layout == 'brats2021' else '-'}{suffixes[m]}.nii.gz")
            sep = "_" if layout == "brats2021" else "-"
            _save(_to_convention(CANONICAL_SEG, convention), root / sub / f"{sub}{sep}seg.nii.gz")
        elif layout == "msd":
            stack = np.stack([images[c] for c in MSD_CHANNELS], axis=-1)
            _save(stack, root / "imagesTr" / f"BRATS_00{seed}.nii.gz")
            _save(_to_convention(CANONICAL_SEG, "msd"), root / "labelsTr" / f"BRATS_00{seed}.nii.gz")
        elif layout in ("json", "csv", "csv_per_scan"):
            for m, img in images.items():
                _save(img, root / "files" / f"{name}_{m}.nii.gz")
            _save(_to_convention(CANONICAL_SEG, "brats2021"), root / "files" / f"{name}_seg.nii.gz")
    if layout == "msd":
        dataset = {
            "name": "BrainTumour",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [
                {"image": f"./imagesTr/BRATS_00{s}.nii.gz", "label": f"./labelsTr/BRATS_00{s}.nii.gz"}
                for s in SUBJECTS.values()
            ],
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(dataset))
        return root
    synonyms = {"t1w": "T1", "t1ce": "t1-gd", "t2w": "T2w", "flair": "t2f"}  # spellings users write
    if layout == "json":
        rows = [
            {
                "subject": n,
                **{synonyms[m]: f"files/{n}_{m}.nii.gz" for m in BRATS_MODALITIES},
                "label": f"files/{n}_seg.nii.gz",
                "pathology": "GBM",
            }
            for n in SUBJECTS
        ]
        (root / "my_list.json").write_text(json.dumps({"label_convention": "brats2021", "training": rows}))
        return root / "my_list.json"
    if layout == "csv":
        with open(root / "list.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject", *[synonyms[m] for m in BRATS_MODALITIES], "seg", "pathology", "label_convention"])
            for n in SUBJECTS:
                w.writerow(
                    [
                        n,
                        *[f"files/{n}_{m}.nii.gz" for m in BRATS_MODALITIES],
                        f"files/{n}_seg.nii.gz",
                        "glioma",
                        "brats2021",
                    ]
                )
        return root / "list.csv"
    if layout == "csv_per_scan":
        with open(root / "scans.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["subject", "image", "modality", "pathology", "seg", "label_convention"])
            for n in SUBJECTS:
                for i, m in enumerate(BRATS_MODALITIES):  # the segmentation is given on one row only
                    w.writerow(
                        [
                            n,
                            f"files/{n}_{m}.nii.gz",
                            synonyms[m],
                            "glioblastoma",
                            f"files/{n}_seg.nii.gz" if i == 0 else "",
                            "brats2021",
                        ]
                    )
        return root / "scans.csv"
    return root


LAYOUTS = ["brats2021", "brats2023", "peds", "msd", "json", "csv", "csv_per_scan"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_back_the_same_canonical_data(tmp_path, layout):
    rows = discover(write_layout(tmp_path, layout))
    assert len(rows) == len(SUBJECTS)
    load = LoadSubjectd(keys=list(BRATS_MODALITIES))
    for row in rows:
        seed = SUBJECTS.get(row["subject"], None)
        if seed is None:  # BraTS / MSD ids: the seed is the id's last digit group
            seed = int(row["subject"].replace("-000", "")[-1])
        assert row["pathology"] == "glioblastoma"
        expected = _images(seed)
        out = load(row)
        for m in BRATS_MODALITIES:
            assert tuple(out[m].shape) == (1, *SHAPE)
            np.testing.assert_array_equal(out[m][0].numpy(), expected[m], err_msg=f"{layout} {m}")
            np.testing.assert_allclose(out[m].affine.numpy(), AFFINE, atol=1e-5)
        np.testing.assert_array_equal(out["seg"][0].numpy(), CANONICAL_SEG, err_msg=layout)


@pytest.mark.parametrize(
    "layout,convention",
    [
        ("brats2021", "brats2021"),
        ("brats2023", "brats2023"),
        ("peds", "peds2024"),
        ("msd", "msd"),
        ("json", "brats2021"),
    ],
)
def test_source_label_convention_is_recorded_per_row(tmp_path, layout, convention):
    assert {r["label_convention"] for r in discover(write_layout(tmp_path, layout))} == {convention}


def test_msd_rows_carry_the_4d_file_and_its_channel_names(tmp_path):
    root = write_layout(tmp_path, "msd")
    dataset = json.loads((root / "dataset.json").read_text())
    dataset["test"] = ["./imagesTs/BRATS_900.nii.gz"]  # MSD lists its unlabelled cases as bare paths
    (root / "dataset.json").write_text(json.dumps(dataset))
    rows = discover(root)
    assert [r.get("split") for r in rows] == [None, None, "test"]  # "training" is all labelled data, not a split
    assert "seg" not in rows[2] and rows[2]["subject"] == "BRATS_900"
    assert rows[0]["image4d_channels"] == list(MSD_CHANNELS)
    assert rows[0]["image4d"].endswith("imagesTr/BRATS_000.nii.gz")
    assert "t1w" not in rows[0]  # voxels live in the 4-D file only


def test_expanded_scans_load_the_right_volume_even_from_a_4d_file(tmp_path):
    rows = discover(write_layout(tmp_path, "msd"))
    scans = expand_scans(rows, modalities=["T1-Gd", "flair"])
    assert [(s["subject"], s["modality"]) for s in scans] == [
        ("BRATS_000", "t1ce"),
        ("BRATS_000", "flair"),
        ("BRATS_001", "t1ce"),
        ("BRATS_001", "flair"),
    ]
    assert {s["pathology"] for s in scans} == {"glioblastoma"}
    out = LoadSubjectd(keys="image", seg_key=None)(scans[0])
    np.testing.assert_array_equal(out["image"][0].numpy(), _images(0)["t1ce"])
    assert "image_channel" not in out  # consumed, so rows from NIfTI and 4-D sources collate together


def test_loading_twice_in_one_pipeline_keeps_the_first_result(tmp_path):
    (row,) = [r for r in discover(write_layout(tmp_path, "brats2021")) if r["subject"].endswith("1")]
    first = LoadSubjectd(keys=["t1w"])(row)
    again = LoadSubjectd(keys=["t1w", "flair"])(first)  # seg_key="seg" too: brats2021 has no 3
    assert again["t1w"] is first["t1w"] and again["seg"] is first["seg"]  # not re-read, seg not remapped twice
    np.testing.assert_array_equal(again["flair"][0].numpy(), _images(1)["flair"])


def test_brasyn_validation_case_is_discovered_without_the_missing_files(tmp_path):
    write_layout(tmp_path, "brats2023")
    case = tmp_path / "BraTS-GLI-00001-000"
    (case / "BraTS-GLI-00001-000-t1c.nii.gz").unlink()
    (case / "BraTS-GLI-00001-000-seg.nii.gz").unlink()
    rows = {r["subject"]: r for r in discover(tmp_path)}
    assert "t1ce" not in rows["BraTS-GLI-00001-000"] and "seg" not in rows["BraTS-GLI-00001-000"]
    assert {"t1w", "t2w", "flair"} <= set(rows["BraTS-GLI-00001-000"])
    with pytest.raises(DatasetError, match="BraTS-GLI-00001-000: no t1ce image"):
        LoadSubjectd(keys=["t1ce"])(rows["BraTS-GLI-00001-000"])
    out = LoadSubjectd(keys=["t1w"])(rows["BraTS-GLI-00001-000"])  # what is there still loads
    assert "seg" not in out and tuple(out["t1w"].shape) == (1, *SHAPE)


def test_peds_convention_can_be_overridden_for_releases_numbered_like_gli(tmp_path):
    root = write_layout(tmp_path, "peds")
    assert {r["label_convention"] for r in discover(root, label_convention="brats2023")} == {"brats2023"}
    with pytest.raises(ValueError, match="unknown label convention"):
        discover(root, label_convention="brats2099")


@pytest.mark.parametrize(
    "convention,source,canonical",
    [
        ("brats2021", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
        ("peds2024", [0, 1, 2, 3, 4], [0, 3, 1, 1, 2]),
        ("msd", [0, 1, 2, 3], [0, 2, 1, 3]),
    ],
)
def test_label_remapping_per_convention(convention, source, canonical):
    np.testing.assert_array_equal(remap_labels(np.array(source, np.float32), convention), canonical)


@pytest.mark.parametrize("convention,bad", [("brats2021", 3), ("brats2023", 4), ("msd", 4)])
def test_label_outside_the_convention_is_an_error_naming_the_file(convention, bad):
    with pytest.raises(DatasetError, match=rf"seg_x\.nii\.gz: label values \[{bad}\] are outside the {convention}"):
        remap_labels(np.array([0, 1, bad]), convention, source="seg_x.nii.gz")


def test_cohort_style_datalist_keeps_its_splits(tmp_path):
    write_layout(tmp_path, "json")
    rows = {n: {"subject": n, "t1w": f"files/{n}_t1w.nii.gz", "pathology": "healthy"} for n in SUBJECTS}
    datalist = {
        "layout": "brats2023",
        "label_convention": "brats2023",
        "seed": 0,
        "training": [rows["s0"]],
        "validation": [rows["s1"]],
        "test": [],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    found = discover(tmp_path)  # a datalist.json inside the folder wins over scanning it
    assert [r["split"] for r in found] == ["training", "validation"]
    assert [r["subject"] for r in split_items(found, "validation")] == ["s1"]
    assert split_items(found, "test", allow_empty=True) == []
    with pytest.raises(DatasetError, match="no subjects in split 'test'"):
        split_items(found, "test")
    assert Path(found[0]["t1w"]) == (tmp_path / "files" / "s0_t1w.nii.gz").resolve()


def test_hash_split_is_deterministic_disjoint_and_complete():
    rows = [{"subject": f"sub-{i:03d}"} for i in range(300)]
    parts = {s: split_items(rows, s) for s in ("training", "validation", "test")}
    again = {s: split_items(list(reversed(rows)), s) for s in parts}
    for s in parts:
        assert {r["subject"] for r in parts[s]} == {r["subject"] for r in again[s]}
    ids = [r["subject"] for s in parts for r in parts[s]]
    assert sorted(ids) == sorted(r["subject"] for r in rows)  # each subject in exactly one split
    assert 0.7 < len(parts["training"]) / 300 < 0.9 and len(parts["validation"]) > 10 and len(parts["test"]) > 10
    other = split_items(rows, "training", fractions=(0.5, 0.25, 0.25))
    assert {r["subject"] for r in other} < {r["subject"] for r in parts["training"]}  # same hash, smaller share


def test_scans_of_one_subject_always_share_a_split():
    subjects = [
        {
            "subject": f"case{i}",
            "t1w": f"/d/case{i}_t1.nii.gz",
            "flair": f"/d/case{i}_flair.nii.gz",
            "pathology": "sclerosis",
        }
        for i in range(40)
    ]
    scans = expand_scans(subjects)
    for split in ("training", "validation", "test"):
        chosen = {r["subject"] for r in split_items(subjects, split, allow_empty=True)}
        assert chosen == {s["subject"] for s in split_items(scans, split, allow_empty=True)}


def test_expand_scans_needs_a_pathology():
    with pytest.raises(DatasetError, match="subjects without a pathology: a"):
        expand_scans([{"subject": "a", "t1w": "/x/a_t1.nii.gz"}])


@pytest.mark.parametrize(
    "row,message",
    [
        ({"subject": "a", "t1w": "a.nii.gz", "pathology": "flu"}, "row 0: unknown pathology 'flu'"),
        ({"subject": "a", "image": "a.nii.gz"}, "row 0: 'image' without a 'modality' field"),
        ({"subject": "a", "image": "a.nii.gz", "modality": "T3"}, "row 0: unknown modality 'T3'"),
        ({"subject": "a", "seg": "a_seg.nii.gz"}, "row 0: no image path"),
        ({"subject": "a", "t1w": "a.nii.gz", "split": "train"}, "row 0: split 'train' is not one of"),
    ],
)
def test_bad_datalist_rows_are_named(tmp_path, row, message):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(DatasetError) as err:
        read_datalist(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_two_files_for_one_modality_is_an_error_naming_both(tmp_path):
    write_layout(tmp_path, "brats2021")
    _save(_images(0)["t1w"], tmp_path / "BraTS2021_00000" / "BraTS2021_00000_t1n.nii.gz")
    with pytest.raises(DatasetError, match=r"BraTS2021_00000_t1n?\.nii\.gz: second file for t1w .*BraTS2021_00000_t1"):
        discover(tmp_path)


def test_resolve_dataset_dir_never_falls_back_to_simulated_data(tmp_path):
    assert resolve_dataset_dir(tmp_path) == tmp_path
    with pytest.raises(DatasetError, match="does-not-exist: dataset_dir does not exist"):
        resolve_dataset_dir(tmp_path / "does-not-exist")
    with pytest.raises(DatasetError, match="dataset path does not exist"):
        discover(tmp_path / "does-not-exist")


def test_demo_cohort_is_built_once_per_setting_and_reused(tmp_path):
    first = resolve_dataset_dir("demo", tmp_path, n_subjects=2, seed=1, spacing=8)
    files = sorted(p for p in first.rglob("*.nii.gz"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert len(files) >= 2 * 5 and first.parent == tmp_path
    again = resolve_dataset_dir("demo", tmp_path, seed=1, spacing=8, n_subjects=2)  # same settings, any order
    assert again == first and [p.stat().st_mtime_ns for p in files] == stamps  # reused, not rewritten
    other = resolve_dataset_dir("demo", tmp_path, n_subjects=2, seed=2, spacing=8)
    assert other != first and other.parent == tmp_path
    assert json.loads((other / "datalist.json").read_text())["seed"] == 2


# --- the simulated cohort, written in each of its layouts, discovered back ------------------------------------
COHORT = dict(n_subjects=4, seed=0, spacing=6)  # 40 x 40 x 26 voxels: a few seconds for all three layouts


@pytest.fixture(scope="module")
def cohort_dirs(tmp_path_factory):
    from brainsynth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    return {
        layout: generate_cohort(root / layout, layout=layout, **COHORT).parent
        for layout in ("brats2023", "brats2021", "msd")
    }


def _load_all(row):
    keys = ["t1w", "t1ce", "t2w", "flair", "pd", "brain_mask"]
    out = LoadSubjectd(keys=keys)(row)
    return {k: out[k].numpy() for k in keys + ["seg"]}, out["t1w"].affine.numpy()


def test_cohort_layouts_discover_to_identical_canonical_data(cohort_dirs):
    from brainsynth.conventions import MODALITIES
    from brainsynth.data import validate_items

    found = {layout: sorted(discover(path), key=lambda r: r["subject"]) for layout, path in cohort_dirs.items()}
    for layout, rows in found.items():
        assert len(rows) == COHORT["n_subjects"]
        validate_items(rows, MODALITIES, require_seg=True)  # every file readable, on one grid, labels valid
    reference = found["brats2023"]
    for layout in ("brats2021", "msd"):
        for ref_row, row in zip(reference, found[layout]):
            assert (row["pathology"], row["split"]) == (ref_row["pathology"], ref_row["split"])
            ref_arrays, ref_affine = _load_all(ref_row)
            arrays, affine = _load_all(row)
            np.testing.assert_allclose(affine, ref_affine, atol=1e-5)
            for key, ref in ref_arrays.items():
                np.testing.assert_array_equal(arrays[key], ref, err_msg=f"{layout} {row['subject']} {key}")
    segs = [np.unique(_load_all(r)[0]["seg"]).tolist() for r in reference]
    assert any(3 in s for s in segs) and any(4 in s for s in segs)  # tumour and lesion labels both came through


def test_cohort_datalist_and_a_bare_folder_scan_agree(cohort_dirs):
    from brainsynth.data.discover import _scan_folder

    for layout in ("brats2023", "brats2021"):
        listed = {r["subject"]: r for r in discover(cohort_dirs[layout])}
        scanned = {r["subject"]: r for r in _scan_folder(cohort_dirs[layout])}
        assert listed.keys() == scanned.keys()
        for subject, row in listed.items():
            for key in ("t1w", "t1ce", "t2w", "flair", "pd", "seg", "brain_mask"):
                assert Path(row[key]) == Path(scanned[subject][key]), (layout, subject, key)
            if row["pathology"] != "sclerosis":  # lesion subjects are canonical-labelled, which only the datalist says
                assert row["label_convention"] == scanned[subject]["label_convention"] == layout


def test_cohort_splits_come_from_its_datalist(cohort_dirs):
    path = cohort_dirs["msd"]
    datalist = json.loads((path / "datalist.json").read_text())
    rows = discover(path)
    for split in ("training", "validation", "test"):
        assert [r["subject"] for r in split_items(rows, split)] == [r["subject"] for r in datalist[split]]


def test_demo_dataset_dir_builds_the_real_cohort_once(tmp_path):
    first = resolve_dataset_dir("demo", tmp_path, n_subjects=2, spacing=6)
    stamp = (first / "datalist.json").stat().st_mtime_ns
    assert resolve_dataset_dir("demo", tmp_path, n_subjects=2, spacing=6) == first
    assert (first / "datalist.json").stat().st_mtime_ns == stamp
    assert sorted(r["subject"] for r in discover(first)) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]


@pytest.mark.parametrize("shape", [(12, 10, 8), (6, 6, 8), (4, 10, 6)])
def test_invert_with_background_pads_with_the_background_value(shape):
    """Undoing a centre crop / pad restores the original grid; the generated region keeps the prediction exactly and
    every voxel the model never produced holds the background value (-1), whatever the mask's size."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, ResizeWithPadOrCrop, ResizeWithPadOrCropd

    from brainsynth.data import InvertWithBackgroundd

    grid = (6, 6, 8)
    pre = Compose([ResizeWithPadOrCropd(keys="mask", spatial_size=grid)])
    data = pre({"mask": MetaTensor(torch.ones(1, *shape))})
    pred = MetaTensor(torch.rand(1, *grid, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    label = MetaTensor(torch.randint(0, 3, (1, *grid), generator=torch.Generator().manual_seed(1)).float())
    out = InvertWithBackgroundd(
        ["pred", "label"], background=[-1.0, None], transform=pre, orig_keys="mask", nearest_interp=[False, True]
    )({**data, "pred": pred, "label": label})
    resize = ResizeWithPadOrCrop(grid)
    inside = resize.inverse(resize(torch.ones(1, *shape))) > 0
    assert tuple(out["pred"].shape[1:]) == shape and tuple(out["label"].shape[1:]) == shape
    assert torch.all(out["pred"][~inside] == -1.0)
    assert torch.all(out["label"][~inside] == 0)  # None: a label map pads with 0
    expected = resize.inverse(resize(torch.zeros(1, *shape)) + pred.as_tensor())  # the prediction where it exists
    assert torch.allclose(out["pred"][inside], torch.as_tensor(expected)[inside], atol=1e-6)


def test_output_naming_follows_the_files_of_a_datalist(tmp_path):
    """One rule for every bundle (brainsynth.data.output_layout_of): a BraTS dataset's layout, else the naming the
    row's own files follow (a datalist of BraTS 2021 files stays BraTS 2021), else BraTS 2023; a choice wins."""
    import json

    from monai.data import MetaTensor

    from brainsynth.data import output_layout_of, read_datalist

    rows = [
        {"subject": "BraTS2021_00001", "t1": "a/BraTS2021_00001_t1.nii.gz", "seg": "a/BraTS2021_00001_seg.nii.gz"},
        {"subject": "BraTS-GLI-00002-000", "t1n": "b/BraTS-GLI-00002-000-t1n.nii.gz"},
        {"subject": "p3", "t1w": "c/p3_t1w.nii.gz"},
        {"subject": "p4", "image": "d/scan.nii.gz", "modality": "t1w"},
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    listed = read_datalist(tmp_path / "list.json")
    assert [r["layout"] for r in listed] == ["datalist"] * 4
    assert [output_layout_of(r) for r in listed] == ["brats2021", "brats2023", "brats2023", "brats2023"]
    assert output_layout_of(listed[0], "brats2023") == "brats2023"
    assert output_layout_of({"layout": "brats2021", "t1w": "x/scan.nii.gz"}) == "brats2021"  # a folder scan's word
    loaded = MetaTensor([0.0], meta={"filename_or_obj": str(tmp_path / "a" / "BraTS2021_00001_t2.nii.gz")})
    assert output_layout_of({"layout": "datalist", "t2w": loaded}) == "brats2021"  # a loaded input's source file

"""check / validate_items: each malformed case, made on disk, gets one clear line naming the file and the problem."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainsynth.data import DatasetError, check_items, discover, validate_items
from brainsynth.data.__main__ import main

SHAPE = (8, 7, 6)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
SUFFIXES = ("t1n", "t1c", "t2w", "t2f")


def _save(array, path: Path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_subject(root: Path, subject: str = "BraTS-GLI-00007-000", seed: int = 0) -> Path:
    """A clean BraTS 2023 subject folder."""
    rng = np.random.default_rng(seed)
    folder = root / subject
    for suffix in SUFFIXES:
        _save(rng.random(SHAPE).astype(np.float32), folder / f"{subject}-{suffix}.nii.gz")
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:5, 2:5, 2:4] = 2
    seg[3, 3, 3] = 3
    _save(seg, folder / f"{subject}-seg.nii.gz")
    return folder


def file_of(folder: Path, suffix: str) -> Path:
    return folder / f"{folder.name}-{suffix}.nii.gz"


def _truncate(path: Path) -> None:
    """Cut the end off a .nii.gz (an interrupted download): the header still reads, the voxels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])


def _cut(path: Path, fraction: float) -> None:
    """Keep only the first ``fraction`` of the file (a download stopped early, header included)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _uncompressed_cut(path: Path) -> None:
    """The file stored as an uncompressed .nii (same name, gzip's magic absent) cut short inside its voxels."""
    data = gzip.decompress(path.read_bytes())
    path.unlink()
    path.with_name(path.name[: -len(".gz")]).write_bytes(data[: len(data) - 100])


def _set_voxels(path: Path, fn) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    fn(data)
    _save(data, path, img.affine)


def _reaffine_every_file(affine: np.ndarray):
    """Every file of the subject rewritten with ``affine`` (a unit mix-up or a damaged header)."""

    def fn(folder: Path):
        for path in folder.glob("*.nii.gz"):
            img = nib.load(str(path))
            _save(np.asarray(img.dataobj).copy(), path, affine)

    return fn


def _constant(value):
    def fn(d):
        d[...] = value

    return fn


# each case: (what to break, file whose name must appear, words that must appear)
CASES = {
    "missing_modality": (lambda f: file_of(f, "t1c").unlink(), "{folder}", "has no t1ce image"),
    "shape_mismatch": (
        lambda f: _save(np.random.rand(8, 7, 5).astype(np.float32), file_of(f, "t2w")),
        "t2w",
        "shape (8, 7, 5) differs",
    ),
    "spacing_mismatch": (
        lambda f: _save(np.random.rand(*SHAPE).astype(np.float32), file_of(f, "t2f"), np.diag([-1.0, -1.0, 2.0, 1.0])),
        "t2f",
        "voxel spacing 1 x 1 x 2 mm differs",
    ),
    "affine_mismatch": (
        lambda f: _save(
            np.random.rand(*SHAPE).astype(np.float32),
            file_of(f, "t1n"),
            np.array([[-1.0, 0, 0, 3], [0, -1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        ),
        "t1n",
        "affine (position / orientation) differs",
    ),
    "label_outside_convention": (
        lambda f: _set_voxels(file_of(f, "seg"), lambda d: d.__setitem__((0, 0, 0), 4)),
        "seg",
        "label values [4] are outside the brats2023 convention",
    ),
    "non_integer_labels": (
        lambda f: _save(np.full(SHAPE, 0.5, np.float32), file_of(f, "seg")),
        "seg",
        "non-integer values",
    ),
    "nan_voxels": (
        lambda f: _set_voxels(file_of(f, "t2w"), lambda d: d.__setitem__((1, 1, 1), np.nan)),
        "t2w",
        "contains 1 NaN and 0 Inf voxels",
    ),
    "inf_voxels": (
        lambda f: _set_voxels(file_of(f, "t1c"), lambda d: d.__setitem__((1, 2, 1), np.inf)),
        "t1c",
        "contains 0 NaN and 1 Inf voxels",
    ),
    "not_nifti": (
        lambda f: file_of(f, "t2f").write_bytes(b"not a nifti file at all"),
        "t2f",
        "not a NIfTI file (named .gz, but its bytes are not gzip-compressed)",
    ),
    "not_nifti_inside_gzip": (
        lambda f: file_of(f, "t2w").write_bytes(gzip.compress(b"<html>404</html>" * 40)),
        "t2w",
        "not a NIfTI file (gzip-compressed, but no NIfTI-1 / NIfTI-2 header)",
    ),
    "empty_file": (lambda f: file_of(f, "t1c").write_bytes(b""), "t1c", "empty file (0 bytes); copy it again"),
    "truncated": (lambda f: _truncate(file_of(f, "t1n")), "t1n", "truncated gzip ("),
    "truncated_in_header": (lambda f: _cut(file_of(f, "t1n"), 0.5), "t1n", "truncated gzip ("),
    "truncated_uncompressed": (
        lambda f: _uncompressed_cut(file_of(f, "seg")),
        "seg",
        "truncated voxel data (Expected",
    ),
    "all_zeros": (lambda f: _set_voxels(file_of(f, "t1c"), _constant(0)), "t1c", "is empty (all zeros)"),
    "constant": (lambda f: _set_voxels(file_of(f, "t2w"), _constant(7)), "t2w", "is constant (every voxel = 7)"),
    "four_d": (
        lambda f: _save(np.random.rand(*SHAPE, 2).astype(np.float32), file_of(f, "t2f")),
        "t2f",
        "is 4-D (shape (8, 7, 6, 2)) where a 3-D volume is expected",
    ),
    "subject_id_disagrees": (
        lambda f: file_of(f, "t2w").rename(f / "BraTS-GLI-00008-000-t2w.nii.gz"),
        "BraTS-GLI-00008-000-t2w",
        "file name says subject 'BraTS-GLI-00008-000'",
    ),
    "implausible_spacing": (
        _reaffine_every_file(np.diag([750.0, 750.0, 750.0, 1.0])),
        "{folder}",
        "outside the plausible 0.1 to 20 mm",
    ),
    "sheared_affine": (
        _reaffine_every_file(np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])),
        "{folder}",
        "the affine is sheared",
    ),
    "empty_brain_mask": (
        lambda f: _save(np.zeros(SHAPE, np.uint8), file_of(f, "brain_mask")),
        "brain_mask",
        "brain mask is empty",
    ),
}


def test_a_clean_dataset_passes(tmp_path):
    for i in range(2):
        folder = make_subject(tmp_path, f"BraTS-GLI-0000{i}-000", seed=i)
        _save(np.ones(SHAPE, np.uint8), file_of(folder, "brain_mask"))
    rows = discover(tmp_path)
    assert validate_items(rows, ["t1w", "t1ce", "t2w", "flair"], require_seg=True) == rows
    reports = check_items(rows)
    assert all(r.usable for r in reports) and reports[0].shape == SHAPE and reports[0].spacing == (1, 1, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_malformed_case_is_named_in_one_line(tmp_path, case):
    break_it, name, words = CASES[case]
    make_subject(tmp_path, "BraTS-GLI-00006-000", seed=1)  # a clean neighbour stays usable
    folder = make_subject(tmp_path)
    break_it(folder)
    rows = discover(tmp_path)
    reports = {r.subject: r for r in check_items(rows, required_modalities=["t1w", "t1ce", "t2w", "flair"])}
    assert reports["BraTS-GLI-00006-000"].usable, reports["BraTS-GLI-00006-000"].problems
    bad = reports[folder.name]
    assert len(bad.problems) == 1, bad.problems
    line = bad.problems[0]
    assert "\n" not in line and words in line
    assert (str(folder) if name == "{folder}" else name) in line
    if name != "{folder}":
        assert line.startswith(str(folder)), line  # the full path of the offending file comes first
    with pytest.raises(DatasetError) as err:
        validate_items(rows, ["t1w", "t1ce", "t2w", "flair"])
    assert err.value.problems == [line]


def test_header_only_check_still_catches_grid_problems_without_reading_voxels(tmp_path):
    folder = make_subject(tmp_path)
    _save(np.random.rand(8, 7, 5).astype(np.float32), file_of(folder, "t2w"))
    _truncate(file_of(folder, "t1n"))  # voxel damage is invisible to a header pass
    (report,) = check_items(discover(tmp_path), read_data=False)
    assert len(report.problems) == 1 and "shape (8, 7, 5) differs" in report.problems[0]


def test_missing_segmentation_only_matters_when_required(tmp_path):
    folder = make_subject(tmp_path)
    file_of(folder, "seg").unlink()
    rows = discover(tmp_path)
    validate_items(rows)
    with pytest.raises(DatasetError, match=rf"{folder}: subject {folder.name} has no segmentation"):
        validate_items(rows, require_seg=True)


def test_default_required_modalities_are_those_of_the_dataset(tmp_path):
    """A BraSyn-style case missing one modality is reported without naming --modalities."""
    make_subject(tmp_path, "BraTS-GLI-00001-000")
    file_of(make_subject(tmp_path, "BraTS-GLI-00002-000"), "t2f").unlink()
    reports = {r.subject: r for r in check_items(discover(tmp_path))}
    assert reports["BraTS-GLI-00001-000"].usable
    assert reports["BraTS-GLI-00002-000"].problems[0].endswith("has no flair image (has t1w, t1ce, t2w)")


def test_msd_4d_file_is_expected_and_checked_per_channel(tmp_path):
    import json

    img = np.random.default_rng(0).random((*SHAPE, 4)).astype(np.float32)
    img[..., 2] = 0
    _save(img, tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    _save(np.zeros(SHAPE, np.uint8), tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
            }
        )
    )
    (report,) = check_items(discover(tmp_path))
    assert report.problems == [f"{tmp_path / 'imagesTr' / 'BRATS_001.nii.gz'}: channel t1ce is empty (all zeros)"]


def test_per_scan_rows_from_a_4d_file_are_checked_on_their_channel(tmp_path):
    from brainsynth.data import expand_scans

    img = np.random.default_rng(0).random((*SHAPE, 4)).astype(np.float32)
    img[..., 1] = np.nan  # the T1w channel
    _save(img, tmp_path / "BRATS_002.nii.gz")
    row = {
        "subject": "BRATS_002",
        "image4d": str(tmp_path / "BRATS_002.nii.gz"),
        "pathology": "glioblastoma",
        "image4d_channels": ["flair", "t1w", "t1ce", "t2w"],
    }
    reports = {r.subject + s["modality"]: r for s, r in zip(expand_scans([row]), check_items(expand_scans([row])))}
    assert reports["BRATS_002flair"].usable and reports["BRATS_002t2w"].usable
    assert reports["BRATS_002t1w"].problems == [
        f"{tmp_path / 'BRATS_002.nii.gz'}: contains {np.prod(SHAPE)} NaN and 0 Inf voxels"
    ]


def test_duplicate_subject_ids_are_reported(tmp_path):
    make_subject(tmp_path / "a")
    make_subject(tmp_path / "b")
    reports = check_items(discover(tmp_path))
    assert all("is used by 2 rows" in r.problems[-1] for r in reports)


def test_cli_report_and_exit_codes(tmp_path, capsys):
    make_subject(tmp_path, "BraTS-GLI-00001-000")
    folder = make_subject(tmp_path, "BraTS-GLI-00002-000", seed=3)
    assert main(["check", str(tmp_path), "--require-seg"]) == 0
    _set_voxels(file_of(folder, "t2f"), lambda d: d.__setitem__((0, 0, 0), np.nan))
    capsys.readouterr()
    assert main(["check", str(tmp_path), "--modalities", "t1n", "t2f", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "OK        BraTS-GLI-00001-000" in out and "UNUSABLE  BraTS-GLI-00002-000" in out
    assert f"    - {file_of(folder, 't2f')}: contains 1 NaN and 0 Inf voxels" in out
    assert out.strip().endswith("2 subjects: 1 usable, 1 unusable")
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: dataset path does not exist" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    folder = make_subject(tmp_path)
    with gzip.open(file_of(folder, "seg"), "wb") as fh:  # a gzip stream that is not a NIfTI
        fh.write(b"\0" * 400)
    done = subprocess.run(
        [sys.executable, "-m", "brainsynth.data", "check", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert f"{file_of(folder, 'seg')}: not a NIfTI file (gzip-compressed, but no NIfTI" in done.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "brainsynth.data", "discover", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and '"label_convention": "brats2023"' in listed.stdout


def test_loader_names_a_file_that_check_would_reject(tmp_path):
    """LoadSubjectd fails with the file's name too (for pipelines that skipped validate_items)."""
    from brainsynth.data import LoadSubjectd

    folder = make_subject(tmp_path)
    _truncate(file_of(folder, "t2w"))
    _set_voxels(file_of(folder, "seg"), lambda d: d.__setitem__((0, 0, 0), 4))
    (row,) = discover(tmp_path)
    with pytest.raises(DatasetError, match=rf"{file_of(folder, 't2w')}: truncated gzip \("):
        LoadSubjectd(keys=["t2w"], seg_key=None)(row)
    with pytest.raises(DatasetError, match=rf"{file_of(folder, 'seg')}: label values \[4\] are outside the brats2023"):
        LoadSubjectd(keys=["t1w"])(row)


#: the three unreadable files of issue 34, each in its own subject of one BraTS folder
UNREADABLE = {
    "BraTS-GLI-00001-000": ("t2f", lambda p: p.write_text("this is not a NIfTI file\n"), "not a NIfTI file"),
    "BraTS-GLI-00002-000": ("t1n", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "BraTS-GLI-00003-000": ("t1c", lambda p: _cut(p, 0.5), "truncated gzip ("),
}


def _folder_with_unreadable_files(root: Path) -> dict[str, Path]:
    for i, subject in enumerate([*UNREADABLE, "BraTS-GLI-00004-000"]):
        folder = make_subject(root, subject, seed=i)
        if subject in UNREADABLE:
            suffix, damage, _ = UNREADABLE[subject]
            damage(file_of(folder, suffix))
    return {s: file_of(root / s, UNREADABLE[s][0]) for s in UNREADABLE}


def test_cli_names_each_unreadable_file_and_checks_every_other_subject(tmp_path):
    """Not a NIfTI, empty, truncated gzip: a row naming each file and its problem, the valid subject listed and
    checked, exit status 1, no traceback (issue 34: the provenance pass once ended the check in one)."""
    bad = _folder_with_unreadable_files(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "brainsynth.data", "check", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    for subject, path in bad.items():
        row = lines.index(next(line for line in lines if line.startswith(f"UNUSABLE  {subject}")))
        assert lines[row + 1] == f"    - {path}: {lines[row + 1].split(': ', 1)[1]}"
        assert UNREADABLE[subject][2] in lines[row + 1] and not lines[row + 2].startswith("    - ")
    assert any(line.startswith("OK        BraTS-GLI-00004-000  t1w t1ce t2w flair seg  8x7x6") for line in lines)
    assert lines[-1] == "4 subjects: 1 usable, 3 unusable"
    listed = subprocess.run(
        [sys.executable, "-m", "brainsynth.data", "discover", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert listed.stdout.strip().endswith("4 subjects")
    assert all(f"UNREADABLE {path} (run check)" in listed.stdout for path in bad.values())


def test_every_reader_names_the_unreadable_file(tmp_path):
    """The loaders bundles use (LoadSubjectd, GuardedLoadImaged (MONAI Label's input), read_nifti, the provenance
    reader) fail with the data check's own line for each kind of unreadable file."""
    from brainsynth.data import GuardedLoadImaged, LoadSubjectd, read_nifti
    from brainsynth.data.provenance import read_provenance

    bad = _folder_with_unreadable_files(tmp_path)
    bad["BraTS-GLI-00004-000"] = file_of(tmp_path / "BraTS-GLI-00004-000", "t2w")
    _truncate(bad["BraTS-GLI-00004-000"])  # the header reads, the voxels do not
    rows = {row["subject"]: row for row in discover(tmp_path)}
    reports = {r.subject: r for r in check_items(rows.values())}
    for subject, path in bad.items():
        (line,) = reports[subject].problems
        key = {"t2f": "flair", "t1n": "t1w", "t1c": "t1ce", "t2w": "t2w"}[path.name.split("-")[-1][: -len(".nii.gz")]]
        loaders = [
            lambda: LoadSubjectd(keys=[key], seg_key=None)(rows[subject]),
            lambda: GuardedLoadImaged("image", ensure_channel_first=True)({"image": path}),
            lambda: read_nifti(path),
        ]
        if subject in UNREADABLE:  # the provenance mark is in the header, which the fourth file still has
            loaders.append(lambda: read_provenance(path))
        for load in loaders:
            with pytest.raises(DatasetError) as err:
                load()
            assert str(err.value).splitlines()[-1] == line

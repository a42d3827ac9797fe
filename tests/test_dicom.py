"""DICOM series: NIfTI -> series -> volume keeps geometry and values; no patient field is written or read back."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from brainsynth.data import DatasetError, LoadSubjectd, check_items, discover, read_dicom_series, write_dicom_series
from brainsynth.engine.io import OutputExistsError

SHAPE = (9, 7, 5)
PATIENT_FIELDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "OtherPatientIDs",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDate",
    "AccessionNumber",
)


def _oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, right-handed grid with an arbitrary origin (like a tilted MR acquisition)."""
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-87.25, 101.5, -40.125]
    return affine


def _nifti(tmp_path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.mark.parametrize("kind", ["integer", "float"])
def test_series_written_from_nifti_reads_back_with_same_geometry_and_values(tmp_path, kind):
    rng = np.random.default_rng(0)
    array = (
        rng.integers(-300, 3000, SHAPE).astype(np.int16)
        if kind == "integer"
        else (rng.random(SHAPE) * 1000 - 50).astype(np.float32)
    )
    source = nib.load(str(_nifti(tmp_path, array, _oblique_affine())))
    write_dicom_series(np.asarray(source.dataobj), source.affine, tmp_path / "series")
    assert len(list((tmp_path / "series").glob("*.dcm"))) == SHAPE[2]
    back, affine = read_dicom_series(tmp_path / "series")
    assert back.shape == SHAPE
    np.testing.assert_allclose(affine, source.affine, atol=1e-4)
    if kind == "integer":
        np.testing.assert_array_equal(back, array)  # integer data is stored exactly
    else:
        slope = (array.max() - array.min()) / 65535
        assert np.abs(back - array).max() <= slope * 0.5 + 1e-4


def test_left_handed_grid_reads_back_as_the_same_physical_image(tmp_path):
    """DICOM orders slices along row x column, so a LAS grid returns with its slice axis reversed."""
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    write_dicom_series(array, affine, tmp_path / "las")
    back, back_affine = read_dicom_series(tmp_path / "las")
    ijk = np.array([[2, 3, 1], [8, 0, 4], [0, 6, 0]])
    for i, j, k in ijk:  # every voxel sits at the same world position with the same value
        world = affine @ [i, j, k, 1]
        i2, j2, k2 = np.round(np.linalg.solve(back_affine, world)[:3]).astype(int)
        assert back[i2, j2, k2] == array[i, j, k]


def test_written_files_hold_no_patient_fields(tmp_path):
    write_dicom_series(np.ones(SHAPE, np.float32) * np.arange(SHAPE[2]), np.eye(4), tmp_path / "s")
    for f in sorted((tmp_path / "s").iterdir()):
        ds = pydicom.dcmread(f)
        assert not [e for e in ds if e.tag.group == 0x0010], f  # the whole patient group is absent
        assert not [name for name in PATIENT_FIELDS if name in ds]
        assert ds.PatientIdentityRemoved == "YES"


def test_patient_fields_of_an_input_series_never_reach_what_is_read(tmp_path):
    """A scanner series carries patient fields; neither read_dicom_series nor LoadSubjectd passes them on."""
    array = np.random.default_rng(1).integers(0, 1000, SHAPE).astype(np.int16)
    folder = write_dicom_series(array, _oblique_affine(), tmp_path / "subj01" / "t1")
    for f in folder.iterdir():  # make it look like it came off a scanner
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "SECRET-4711", "19700101"
        ds.InstitutionName = "Hospital of Secrets"
        ds.save_as(f)
    back, affine = read_dicom_series(folder)
    np.testing.assert_array_equal(back, array)
    out = LoadSubjectd(keys=["t1w"])({"subject": "subj01", "t1w": str(folder)})
    np.testing.assert_array_equal(out["t1w"][0].numpy(), array)
    np.testing.assert_allclose(out["t1w"].affine.numpy(), _oblique_affine(), atol=1e-4)
    everything = repr(out["t1w"].meta) + repr(out) + repr(back.dtype) + repr(affine)
    for secret in ("Doe", "Jane", "SECRET", "4711", "19700101", "Secrets", "Patient"):
        assert secret not in everything


def test_discovered_dicom_subject_loads_like_its_nifti_twin(tmp_path):
    rng = np.random.default_rng(2)
    volumes = {m: rng.integers(0, 500, SHAPE).astype(np.int16) for m in ("T1", "FLAIR")}
    for name, vol in volumes.items():
        write_dicom_series(vol, _oblique_affine(), tmp_path / "sub-01" / name)
    (row,) = discover(tmp_path)
    assert row["subject"] == "sub-01" and Path(row["t1w"]).name == "T1" and Path(row["flair"]).name == "FLAIR"
    out = LoadSubjectd(keys=["t1w", "flair"])(row)
    np.testing.assert_array_equal(out["flair"][0].numpy(), volumes["FLAIR"])
    (report,) = check_items([row])
    assert report.usable and report.shape == SHAPE


def test_missing_slice_is_an_error_naming_the_folder(tmp_path):
    folder = write_dicom_series(np.ones(SHAPE, np.int16) * 5, np.eye(4), tmp_path / "gap")
    sorted(folder.iterdir())[2].unlink()
    with pytest.raises(DatasetError, match=rf"{folder}: uneven slice spacing .* a slice is missing"):
        read_dicom_series(folder)
    (report,) = check_items([{"subject": "gap", "t1w": str(folder)}])
    assert report.problems[0].startswith(f"{folder}: uneven slice spacing")


def test_two_series_in_one_folder_and_an_empty_folder_are_errors(tmp_path):
    a = write_dicom_series(np.ones(SHAPE, np.int16), np.eye(4), tmp_path / "a")
    b = write_dicom_series(np.ones(SHAPE, np.int16), np.eye(4), tmp_path / "b")
    for f in b.iterdir():
        f.rename(a / f"b_{f.name}")
    with pytest.raises(DatasetError, match=rf"{a}: holds 2 DICOM series"):
        read_dicom_series(a)
    with pytest.raises(DatasetError, match=rf"{b}: no DICOM series found"):
        read_dicom_series(b)


def test_writer_never_replaces_an_existing_series_unless_asked(tmp_path):
    folder = write_dicom_series(np.zeros(SHAPE, np.int16), np.eye(4), tmp_path / "s")
    with pytest.raises(OutputExistsError):
        write_dicom_series(np.ones(SHAPE, np.int16), np.eye(4), folder)
    write_dicom_series(np.full(SHAPE, 3, np.int16), np.eye(4), folder, overwrite=True)
    assert read_dicom_series(folder)[0].max() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left behind


def _write_series_by_hand(folder: Path, pixels: np.ndarray, row_cos, col_cos, spacing_rc, step, origin, slope, icept):
    """A series written with pydicom alone, tag by tag from the DICOM standard (not with the project's writer):
    ``pixels[k, r, c]`` stored values of slice k, row r, column c. Files are named in shuffled order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir()
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(row_cos, col_cos)
    order = np.random.default_rng(0).permutation(pixels.shape[0])
    for k in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"im{order[k]:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "MR", int(order[k]) + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * step * normal]
        ds.PixelSpacing = [float(spacing_rc[0]), float(spacing_rc[1])]  # row spacing, column spacing
        ds.SliceThickness = float(step)
        ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, icept
        ds.PixelData = pixels[k].astype("<i2").tobytes()
        ds.save_as(str(folder / f"im{order[k]:03d}.dcm"), enforce_file_format=True)


def test_series_from_another_writer_reads_with_the_geometry_the_standard_defines(tmp_path):
    """Reference independent of the project's writer: a pydicom-built oblique series, its RAS affine worked out
    by hand from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (DICOM PS3.3 C.7.6.2.1.1)."""
    rows, cols, slices = 6, 5, 4
    pixels = np.arange(slices * rows * cols, dtype=np.int16).reshape(slices, rows, cols) * 3 - 40
    a = 0.25
    row_cos = np.array([np.cos(a), np.sin(a), 0.0])  # direction of increasing column index (LPS)
    col_cos = np.array([0.0, 0.0, -1.0])  # direction of increasing row index: a coronal-ish tilted plane
    spacing_rc, step, origin = (1.5, 0.8), 3.0, np.array([-12.5, 40.25, 60.0])
    _write_series_by_hand(tmp_path / "series", pixels, row_cos, col_cos, spacing_rc, step, origin, 0.5, -7.0)

    array, affine = read_dicom_series(tmp_path / "series")
    # voxel (i = column, j = row, k = slice) sits at origin + i * dc * row_cos + j * dr * col_cos + k * step * n
    normal = np.cross(row_cos, col_cos)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_cos * spacing_rc[1], col_cos * spacing_rc[0], normal * step
    lps[:3, 3] = origin
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    np.testing.assert_allclose(affine, expected, atol=1e-4)
    assert array.shape == (cols, rows, slices)
    np.testing.assert_allclose(array, pixels.transpose(2, 1, 0) * 0.5 - 7.0)  # rescale applied, every voxel

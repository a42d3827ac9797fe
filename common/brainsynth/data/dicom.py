"""DICOM series input (a folder of 2-D slices) and a de-identified series writer.

Geometry: DICOM positions are in patient LPS millimetres, nibabel / MONAI affines are RAS, so
``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``. Arrays are indexed ``[i, j, k]`` like a nibabel image:
``i`` runs along a slice's rows (DICOM column index), ``j`` down its columns (DICOM row index), ``k`` across
slices. Only geometry and pixel values are read; no DICOM attribute (patient or otherwise) is returned.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from brainsynth.data.errors import DatasetError
from brainsynth.engine.io import OutputExistsError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Relative tolerance on the distance between consecutive slices before the series is called non-uniform
# (a missing slice doubles one gap, far above this).
_SLICE_GAP_RTOL = 0.01


def is_dicom_series(path: str | os.PathLike) -> bool:
    """True for a folder holding at least one DICOM file (checked by the 'DICM' preamble marker)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir()):
        if f.is_file() and _has_dicom_preamble(f):
            return True
    return False


def _has_dicom_preamble(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _series_files(folder: Path, series_id: str | None) -> list[str]:
    import SimpleITK as sitk

    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of DICOM slices")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise DatasetError(f"{folder}: no DICOM series found in this folder")
    if series_id is None:
        if len(ids) > 1:
            raise DatasetError(
                f"{folder}: holds {len(ids)} DICOM series ({', '.join(ids)}); "
                "put each series in its own folder or pass series_id"
            )
        series_id = ids[0]
    elif series_id not in ids:
        raise DatasetError(f"{folder}: no DICOM series {series_id!r} (found {', '.join(ids)})")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))


def _check_slice_positions(folder: Path, files: list[str]) -> None:
    """Reject series with missing slices, uneven gaps or mixed orientations (headers only, no pixel data)."""
    import pydicom

    if len(files) < 2:
        return
    positions, orientations = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]
            )
            positions.append([float(v) for v in ds.ImagePositionPatient])
            orientations.append([float(v) for v in ds.ImageOrientationPatient])
        except Exception as e:  # missing tag or unreadable header
            raise DatasetError(f"{f}: DICOM slice without a readable position/orientation ({e})") from e
    orientations = np.asarray(orientations)
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise DatasetError(f"{folder}: slices have different orientations (ImageOrientationPatient)")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(along)
    if gaps.min() <= 0:
        raise DatasetError(f"{folder}: two slices share the same position; duplicated or mixed series")
    if np.abs(gaps - gaps.mean()).max() > _SLICE_GAP_RTOL * gaps.mean():
        raise DatasetError(
            f"{folder}: uneven slice spacing (gaps {gaps.min():.3g} to {gaps.max():.3g} mm); "
            "a slice is missing or the series is not one volume"
        )


def read_dicom_series(folder: str | os.PathLike, series_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a folder of DICOM slices into ``(array[i, j, k] float32, RAS affine 4x4)``.

    SimpleITK (GDCM) sorts the slices along their normal and applies rescale slope / intercept. No DICOM
    attribute other than the geometry leaves this function, so patient fields cannot reach an output.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    files = _series_files(folder, series_id)
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOff()  # never load per-slice tags (patient fields among them)
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{folder}: DICOM series cannot be read ({str(e).strip().splitlines()[-1]})") from e
    if image.GetDimension() != 3:
        raise DatasetError(f"{folder}: expected a 3-D series, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{folder}: colour / multi-component DICOM is not an MR volume")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)  # (k, j, i) -> (i, j, k)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    return np.ascontiguousarray(array), LPS_TO_RAS @ affine_lps


def _pixel_encoding(array: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """Stored integers, slope and intercept, signedness: exact for integer-valued data, else 16-bit quantised."""
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError("array has NaN or Inf voxels; DICOM cannot store them")
    lo, hi = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)) and lo >= -32768 and hi <= 32767:
        signed = lo < 0
        return array.astype(np.int16 if signed else np.uint16), 1.0, 0.0, signed
    from pydicom.valuerep import DSfloat

    # DICOM decimal strings hold 16 characters: quantise with the values exactly as they will be read back
    slope = float(DSfloat((hi - lo) / 65535.0 if hi > lo else 1.0, auto_format=True))
    intercept = float(DSfloat(lo, auto_format=True))
    stored = np.round((array - intercept) / slope).clip(0, 65535).astype(np.uint16)
    return stored, slope, intercept, False


def write_dicom_series(
    array,
    affine: np.ndarray,
    folder: str | os.PathLike,
    overwrite: bool = False,
    series_description: str = "brainsynth",
    modality: str = "MR",
) -> Path:
    """Write a 3-D ``array[i, j, k]`` with RAS ``affine`` as one DICOM file per ``k`` slice in ``folder``.

    No patient-module attribute (group 0x0010: name, ID, birth date, sex, ...) and no date, institution or
    operator field is written; the UIDs are random. Integer-valued data is stored exactly; anything else
    as 16-bit integers with one rescale slope / intercept for the whole series (error <= slope / 2).
    The folder is filled in a temporary sibling and renamed into place, so a crash never leaves half a series.
    A right-handed index frame (det(affine[:3, :3]) > 0, as in most NIfTI files) reads back with the same
    affine; a left-handed one reads back with the slice axis reversed (same physical image), since DICOM
    readers order slices along row x column.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    from pydicom.valuerep import DSfloat

    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{folder}: write_dicom_series needs a 3-D array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder}: already exists; pass overwrite=True to replace it")

    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{folder}: affine has a zero-length axis")
    row_dir, col_dir = affine_lps[:3, 0] / spacing[0], affine_lps[:3, 1] / spacing[1]
    stored, slope, intercept, signed = _pixel_encoding(array.astype(np.float64))

    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    tmp_dir.mkdir()
    try:
        for k in range(array.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.Modality = modality
            ds.SeriesDescription = series_description
            ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.PatientIdentityRemoved = "YES"
            ds.ImagePositionPatient = [float(v) for v in affine_lps[:3, :3] @ [0, 0, k] + affine_lps[:3, 3]]
            ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
            ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
            ds.Rows, ds.Columns = array.shape[1], array.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.RescaleSlope = DSfloat(slope, auto_format=True)
            ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
            ds.save_as(tmp_dir / f"slice_{k:04d}.dcm", enforce_file_format=True)
        if folder.exists():  # overwrite=True (checked above); replace only once the new series is complete
            shutil.rmtree(folder)
        os.replace(tmp_dir, folder)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return folder

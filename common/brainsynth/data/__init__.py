"""The shared data layer: dataset discovery, validation (``check``), DICOM input, the canonical loading transform.

    rows = discover(resolve_dataset_dir(dataset_dir, cache_dir))     # any layout -> canonical rows
    validate_items(rows, ["t1w", "t1ce", "t2w", "flair"], True)     # DatasetError before any work starts
    train = split_items(rows, "training")                           # datalist split, else hash of subject id
    LoadSubjectd(keys=["t1w", "flair"])                              # MetaTensors, seg in canonical labels

CLI: ``python -m brainsynth.data check DIR [--modalities ...] [--require-seg]`` and ``... discover DIR``.
"""

from brainsynth.data.check import SubjectReport, check_items, check_row, validate_items
from brainsynth.data.dicom import is_dicom_series, read_dicom_series, write_dicom_series
from brainsynth.data.discover import (
    SPLITS,
    discover,
    layout_of_files,
    output_layout_of,
    read_datalist,
    resolve_dataset_dir,
    subject_from_path,
)
from brainsynth.data.errors import DatasetError
from brainsynth.data.items import (
    available_modalities,
    expand_scans,
    image_source,
    select_split,
    split_items,
    split_of,
)
from brainsynth.data.reader import describe_unreadable, nifti_voxels, open_nifti, read_nifti


def __getattr__(name):
    # the MONAI transform stack is imported only when a pipeline needs it, keeping the CLI quick to start
    transforms_names = ("InvertWithBackgroundd", "LoadSubjectd", "load_volume", "remap_labels")
    if name in (*transforms_names, "GuardedNibabelReader", "GuardedLoadImaged"):
        from brainsynth.data import transforms

        return getattr(transforms, name)
    if name == "provenance":  # the synthetic mark (imported on first use, like the transforms)
        import importlib

        return importlib.import_module("brainsynth.data.provenance")
    raise AttributeError(f"module 'brainsynth.data' has no attribute {name!r}")


__all__ = [
    "DatasetError",
    "GuardedLoadImaged",
    "GuardedNibabelReader",
    "InvertWithBackgroundd",
    "LoadSubjectd",
    "SPLITS",
    "SubjectReport",
    "available_modalities",
    "check_items",
    "check_row",
    "describe_unreadable",
    "discover",
    "expand_scans",
    "image_source",
    "is_dicom_series",
    "load_volume",
    "read_datalist",
    "read_dicom_series",
    "remap_labels",
    "resolve_dataset_dir",
    "select_split",
    "split_items",
    "split_of",
    "subject_from_path",
    "layout_of_files",
    "nifti_voxels",
    "open_nifti",
    "output_layout_of",
    "read_nifti",
    "validate_items",
    "write_dicom_series",
]

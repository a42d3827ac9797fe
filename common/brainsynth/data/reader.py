"""The one guarded NIfTI reader: every file the data check, a bundle or a script opens goes through here.

nibabel reports a bad file with whatever its lowest layer raised (``ImageFileError: Cannot work out file type``,
``EOFError``, ``OSError: Expected 1344 bytes``); here each becomes one ``DatasetError`` line that names the file and
says what is wrong with it in a user's words (empty, not a NIfTI, truncated gzip, truncated voxel data) and what to
do. ``open_nifti`` reads the header, ``nifti_voxels`` the voxels, ``read_nifti`` both; ``GuardedNibabelReader`` is
MONAI's ``NibabelReader`` with the same errors (``brainsynth.data.GuardedLoadImaged``: ``LoadImaged`` through it).
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from brainsynth.data.errors import DatasetError

_GZIP_MAGIC = b"\x1f\x8b"
_COPY_AGAIN = "copy it again from its source"


def _gzip_state(path: Path) -> str | None:
    """Why a gzip file does not decompress (``truncated`` / ``corrupt: ...``), or None when it does."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except EOFError:
        return "truncated"
    except (OSError, zlib.error) as e:
        return f"corrupt ({' '.join(str(e).split())})"
    return None


def describe_unreadable(path: str | os.PathLike, error: BaseException | None = None) -> str:
    """One line ``<path>: <what is wrong>; <what to do>`` for a file nibabel could not read (``error``)."""
    p = Path(path)
    if not p.exists():
        return f"{p}: file not found"
    if p.is_dir():
        return f"{p}: is a folder, not a NIfTI file"
    size = p.stat().st_size
    if size == 0:
        return f"{p}: empty file (0 bytes); {_COPY_AGAIN}"
    with open(p, "rb") as fh:
        compressed = fh.read(2) == _GZIP_MAGIC
    if p.name.lower().endswith(".gz") and not compressed:
        return f"{p}: not a NIfTI file (named .gz, but its bytes are not gzip-compressed)"
    if compressed:
        state = _gzip_state(p)
        if state == "truncated":
            return (
                f"{p}: truncated gzip ({size} bytes; the compressed data ends early, as after an interrupted copy or "
                f"download); {_COPY_AGAIN}"
            )
        if state:
            return f"{p}: corrupt gzip data ({state[len('corrupt (') : -1]}); {_COPY_AGAIN}"
    if isinstance(error, (EOFError, OSError, ValueError)) and "bytes" in str(error):
        got = " ".join(str(error).split("\n")[0].split())  # nibabel: "Expected N bytes, got M bytes from <path>"
        return f"{p}: truncated voxel data ({got.split(' from ')[0]}); {_COPY_AGAIN}"
    if error is not None and not isinstance(error, (EOFError, OSError, ValueError, zlib.error)):
        return f"{p}: not a NIfTI file ({'gzip-compressed, but ' if compressed else ''}no NIfTI-1 / NIfTI-2 header)"
    reason = f" ({type(error).__name__}: {' '.join(str(error).split())})" if error is not None else ""
    return f"{p}: corrupt voxel data{reason}; {_COPY_AGAIN}"


def open_nifti(path: str | os.PathLike) -> Any:
    """The nibabel image of ``path`` (header read, voxels not yet); a ``DatasetError`` naming the file otherwise."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise DatasetError(describe_unreadable(p))
    try:
        return nib.load(str(p))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, ValueError, ... for bad files
        raise DatasetError(describe_unreadable(p, e)) from e


def nifti_voxels(image: Any, path: str | os.PathLike | None = None, dtype: Any = None) -> np.ndarray:
    """The voxels of an image from ``open_nifti`` (as ``dtype`` when given); a ``DatasetError`` naming the file when
    they cannot be read (a truncated or corrupt file whose header still reads)."""
    path = path if path is not None else image.get_filename()
    try:
        return np.asanyarray(image.dataobj) if dtype is None else np.asarray(image.dataobj, dtype=dtype)
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise DatasetError(describe_unreadable(path, e)) from e


def read_nifti(path: str | os.PathLike, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels, affine)`` of a NIfTI file through the guarded reader."""
    image = open_nifti(path)
    return nifti_voxels(image, path, dtype), np.asarray(image.affine, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _monai_nibabel_reader():
    from monai.data import NibabelReader

    class GuardedNibabelReader(NibabelReader):
        """MONAI's ``NibabelReader`` whose voxel-read failures are the guarded reader's ``DatasetError`` lines (the
        file and the problem). MONAI's ``LoadImage`` turns a failing ``read`` into "cannot find a suitable reader",
        so header problems are caught before it runs: ``GuardedLoadImaged`` / ``load_volume`` call ``open_nifti``."""

        def get_data(self, img):
            try:
                return super().get_data(img)
            except (EOFError, OSError, ValueError, zlib.error) as e:
                images = img if isinstance(img, (list, tuple)) else [img]
                raise DatasetError(describe_unreadable(images[0].get_filename(), e)) from e

    return GuardedNibabelReader


def __getattr__(name):
    # MONAI is imported only when its reader is asked for, keeping the data check's CLI quick to start
    if name == "GuardedNibabelReader":
        return _monai_nibabel_reader()
    raise AttributeError(f"module 'brainsynth.data.reader' has no attribute {name!r}")

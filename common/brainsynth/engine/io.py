"""Safe writing: every output is written to a temporary file in the target folder and renamed into place,
so a crash never leaves a half-written file, and an existing file is never replaced unless asked."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class OutputExistsError(FileExistsError):
    """Raised instead of silently replacing an earlier output."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` in one step.

    The temporary name keeps the final suffixes (e.g. ``.nii.gz``) so writers that infer the format from
    the name behave the same. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp_path
        if not overwrite and path.exists():  # appeared while we were writing
            raise OutputExistsError(f"{path}: was created by someone else while writing; not replaced")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def save_nifti(
    array: Any,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    reference: Any = None,
    overwrite: bool = False,
    dtype: Any = np.float32,
    provenance: dict | None = None,
) -> Path:
    """Write ``array`` as NIfTI, atomically, in the geometry of ``reference`` (a path or nibabel image) if given.

    With a reference, its affine, qform/sform codes, zooms and orientation are kept so the output overlays the
    input exactly; its free-text header fields (descrip, aux_file, intent_name, db_name) are not copied, since
    they may carry anything. ``array`` may be a numpy array or a torch tensor; it must have the reference's spatial
    shape. ``provenance`` (a ``brainsynth.data.provenance`` record) marks a generated volume: header marker and a
    JSON sidecar ``<name>.json`` beside it.
    """
    import nibabel as nib

    from brainsynth.data.reader import open_nifti

    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array).astype(dtype, copy=False)
    header = None
    if reference is not None:
        ref = open_nifti(reference) if isinstance(reference, (str, os.PathLike)) else reference
        if tuple(ref.shape[:3]) != tuple(array.shape[:3]):
            raise ValueError(
                f"{path}: output shape {array.shape[:3]} differs from the reference "
                f"{getattr(ref, 'get_filename', lambda: '')() or 'image'} shape {ref.shape[:3]}"
            )
        affine = ref.affine
        header = ref.header.copy()
        header.set_data_dtype(dtype)
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            if field in header:
                header[field] = b""
    if affine is None:
        affine = np.eye(4)
    img = nib.Nifti1Image(array, affine, header=header)
    if header is None:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    if provenance is not None:
        import json

        from brainsynth.data.provenance import mark_header, sidecar_path

        mark_header(img.header, provenance)
    with atomic_path(path, overwrite) as tmp:
        nib.save(img, str(tmp))
    if provenance is not None:
        atomic_write_text(sidecar_path(path), json.dumps(provenance, indent=1, sort_keys=True) + "\n", overwrite)
    return Path(path)


def hash_record_path(path: str | os.PathLike) -> Path:
    """``<weights>.sha256`` beside a weight file: one line ``<hex digest>  <file name>``, the format ``sha256sum``
    writes, so ``sha256sum -c model.pt.sha256`` checks it too."""
    return Path(str(path) + ".sha256")


def save_checkpoint(obj: dict, path: str | os.PathLike, record: bool = False) -> Path:
    """torch.save a checkpoint atomically (always replaces: a checkpoint is meant to be updated); with ``record``,
    its sha256 goes beside it (``hash_record_path``) so a later load can refuse a damaged or swapped file."""
    import torch

    path = Path(path)
    try:
        with atomic_path(path, overwrite=True) as tmp:
            torch.save(obj, str(tmp))
    except (OSError, RuntimeError) as e:
        import shutil

        free = shutil.disk_usage(path.parent).free / 2**30 if path.parent.exists() else float("nan")
        raise OSError(f"{path}: could not be written ({e}); {free:.1f} GB free on its disk") from e
    if record:
        from brainsynth.data.provenance import sha256_file

        atomic_write_text(hash_record_path(path), f"{sha256_file(path)}  {path.name}\n", overwrite=True)
    return path


class WeightIntegrityError(RuntimeError):
    """A weight file that does not match its sha256 record, or holds NaN / Inf values."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", require_record: bool = False) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never arbitrary code.

    The file must match its sha256 record when one is beside it (``save_checkpoint(record=True)`` writes it); with
    ``require_record`` a missing record is a warning saying how to create one. Every floating-point tensor must be
    finite. Each refusal names the file and what to do."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    record = hash_record_path(path)
    if record.is_file():
        from brainsynth.data.provenance import sha256_file

        expected = record.read_text().split()[0] if record.read_text().split() else ""
        actual = sha256_file(path)
        if actual != expected:
            raise WeightIntegrityError(
                f"{path}: sha256 {actual} does not match its record {record.name} ({expected}); the file is damaged "
                f"or not the one that training wrote. Restore it, or delete the record if you replaced the weights "
                f"on purpose"
            )
    elif require_record:
        import logging

        logging.getLogger(__name__).warning(
            "%s has no integrity record; create one with `sha256sum %s > %s` (training writes it)",
            path,
            path.name,
            record.name,
        )
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle with code objects, ...
        raise RuntimeError(f"{path}: cannot be loaded as a weights-only checkpoint ({e})") from e
    bad = _non_finite(obj)
    if bad:
        raise WeightIntegrityError(
            f"{path}: {len(bad)} tensor(s) hold NaN or Inf (e.g. {', '.join(bad[:3])}); these weights would "
            f"generate NaN volumes. Use an earlier checkpoint, or retrain"
        )
    return obj


def _non_finite(obj: Any, prefix: str = "") -> list[str]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [name for k, v in items for name in _non_finite(v, f"{prefix}.{k}" if prefix else str(k))]

"""Provenance of synthetic scans: every generated volume says, machine-readably, that it is synthetic.

Two marks, written by ``brainsynth.engine.io.save_nifti(..., provenance=record)``:

* the NIfTI header: ``descrip`` starts with ``SYNTHETIC brainsynth <bundle> <version>`` (MARKER) and
  ``intent_name`` is ``synthetic``; both travel with the file through copies and most NIfTI tools;
* a BIDS-style JSON sidecar beside it (``<name>.json``) with the whole record: ``synthetic: true``, the bundle and its
  version, the sha256 of the weights, the conditions (hashes of input files, never their names or any patient
  field; or pathology / modality), sampler, steps, guidance, seed, date and software versions.

``read_provenance(path)`` reads the sidecar, else the header mark; ``is_synthetic`` answers yes / no;
``refuse_synthetic`` stops an evaluation whose real (held-out) data holds a synthetic file. CLI:
``python -m brainsynth.data provenance FILE_OR_DIR ...`` prints the records; exit status 0 when every file is
synthetic, 1 when some file carries no mark (real, or of unknown origin), 2 when a file cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from brainsynth.data.errors import DatasetError

MARKER = "SYNTHETIC brainsynth"
INTENT_NAME = "synthetic"
PROVENANCE_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file (``brainsynth.engine.bundle_archive.file_hash``, the archives' own hasher)."""
    from brainsynth.engine.bundle_archive import file_hash

    return file_hash(path, "sha256")


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    path = Path(nifti_path)
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_name(path.stem + ".json")


def _software() -> dict:
    import monai
    import torch

    import brainsynth

    return {
        "brainsynth": brainsynth.__version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class RunProvenance:
    """What one generation run records in every output; ``record(conditions)`` adds one output's conditions.

    Args:
        bundle_dir: the bundle's folder (its name is the bundle id; ``configs/metadata.json`` gives the display name
            and version).
        weights: the weight file used (its sha256 is recorded; a missing file records None).
        sampler, num_inference_steps, seed, guidance: the sampling settings.
        settings: any further settings worth keeping (plain JSON values).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        sampler: str = "",
        num_inference_steps: int | None = None,
        seed: int | None = None,
        guidance: Any = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        meta_file = Path(bundle_dir) / "configs" / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.bundle = Path(bundle_dir).resolve().name  # the bundle's id (its folder, as in MONAI's model zoo)
        self.bundle_name = meta.get("name", self.bundle)
        self.version = meta.get("version", "unknown")
        self.weights = Path(weights) if weights else None
        self.sampler, self.num_inference_steps, self.seed = str(sampler), num_inference_steps, seed
        self.guidance = guidance
        self.settings = dict(settings or {})
        self._weights_sha256: str | None = None

    @property
    def weights_sha256(self) -> str | None:
        if self._weights_sha256 is None and self.weights is not None and self.weights.is_file():
            self._weights_sha256 = sha256_file(self.weights)
        return self._weights_sha256

    @property
    def descrip(self) -> str:
        return f"{MARKER} {self.bundle} {self.version}"[:80]  # the NIfTI field holds 80 bytes

    def record(self, conditions: Mapping[str, Any], **extra: Any) -> dict:
        return {
            "synthetic": True,
            "provenance_version": PROVENANCE_VERSION,
            "generator": "brainsynth",
            "bundle": self.bundle,
            "bundle_name": self.bundle_name,
            "bundle_version": self.version,
            "weights_sha256": self.weights_sha256,
            "conditions": _plain(conditions),
            "sampler": self.sampler,
            "num_inference_steps": self.num_inference_steps,
            "guidance": _plain(self.guidance),
            "seed": self.seed,
            "settings": _plain(self.settings),
            **_plain(extra),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "software": _software(),
            "descrip": self.descrip,
        }


def _plain(value: Any) -> Any:
    """JSON-safe copy (tensors and numpy values become lists / numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def input_hashes(files: Mapping[str, Any]) -> dict:
    """{key: sha256} of input files (names dropped: a file name can identify a person)."""
    out = {}
    for key, path in files.items():
        if path and Path(str(path)).is_file():
            out[f"{key}_sha256"] = sha256_file(str(path))
        elif path and Path(str(path)).is_dir():  # a DICOM series folder: hash of its sorted file hashes
            inner = sorted(sha256_file(p) for p in Path(str(path)).rglob("*") if p.is_file())
            out[f"{key}_sha256"] = hashlib.sha256("".join(inner).encode()).hexdigest()
    return out


def mark_header(header: Any, record: Mapping[str, Any]) -> None:
    """Write the marker into a nibabel NIfTI header (``descrip`` and ``intent_name``)."""
    header["descrip"] = str(record.get("descrip") or MARKER)[:80].encode("ascii", "replace")
    header["intent_name"] = INTENT_NAME.encode()


def read_provenance(path: str | os.PathLike, header: Any = None) -> dict | None:
    """The provenance record of a volume: its sidecar, else what the header mark says; None when unmarked.
    ``header``: the file's NIfTI header when the caller has read it already. Raises ``DatasetError`` naming the
    file when it cannot be read (the guarded reader's line)."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text())
        except ValueError as e:
            raise DatasetError(f"{sidecar}: provenance sidecar is not valid JSON ({e})") from e
        if isinstance(record, dict) and record.get("synthetic") is True:
            return {**record, "source": "sidecar"}
    if path.is_dir() or not path.name.endswith((".nii", ".nii.gz")):
        return None
    if header is None:
        from brainsynth.data.reader import open_nifti

        header = open_nifti(path).header
    descrip = bytes(header["descrip"].tobytes()).split(b"\0")[0].decode("ascii", "replace")
    if descrip.startswith(MARKER):
        parts = descrip[len(MARKER) :].split()
        return {
            "synthetic": True,
            "bundle": parts[0] if parts else None,
            "bundle_version": parts[1] if len(parts) > 1 else None,
            "descrip": descrip,
            "source": "header",
        }
    return None


def is_synthetic(path: str | os.PathLike) -> bool:
    return read_provenance(path) is not None


def synthetic_files(row: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[str]:
    """The files of a datalist row (image keys by default) that are marked synthetic."""
    from brainsynth.conventions import MODALITIES

    keys = list(keys) if keys is not None else [k for k in row if k in MODALITIES]
    return [str(row[k]) for k in keys if isinstance(row.get(k), (str, os.PathLike)) and is_synthetic(row[k])]


def refuse_synthetic(
    rows: Iterable[Mapping[str, Any]], what: str = "real reference data", keys: Iterable[str] | None = None
) -> list:
    """Return ``rows`` unchanged, or raise ``DatasetError`` naming every synthetic file among them: data that must
    be real (a held-out test split, an evaluation's reference) never silently includes generated scans."""
    rows = list(rows)
    found = [f for row in rows for f in synthetic_files(row, keys)]
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise DatasetError(
            f"{shown}: synthetic (brainsynth provenance mark) but used as {what}; remove generated "
            f"volumes from this data, or point the evaluation at real scans"
        )
    return rows


def count_synthetic(rows: Iterable[Mapping[str, Any]], keys: Iterable[str] | None = None) -> dict:
    """{"synthetic": n, "real": m} subjects (a subject is synthetic when any of its images is)."""
    rows = list(rows)
    n = sum(1 for row in rows if synthetic_files(row, keys))
    return {"synthetic": n, "real": len(rows) - n}


def main(paths: list[str]) -> int:
    status = 0
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.rglob("*.nii*") if q.is_file()) if p.is_dir() else [p]
    if not files:
        print(f"no NIfTI file under {', '.join(paths)}")
        return 2
    for f in files:
        try:
            record = read_provenance(f)
        except DatasetError as e:
            print(f"UNREADABLE  {e}")
            status = 2
            continue
        if record is None:
            print(f"NOT MARKED  {f} (no synthetic mark: real, or of unknown origin)")
            status = max(status, 1)
        else:
            print(f"SYNTHETIC   {f}\n" + json.dumps(record, indent=1, sort_keys=True))
    return status

"""Weight files of a released bundle archive: listing them in ``large_files.yml`` and refusing a file whose hash
does not match.

``large_files.yml`` is MONAI's format (``python -m monai.bundle download_large_files`` reads it): a list of
``{path, url, hash_val, hash_type}`` entries, paths relative to the bundle root. A bundle calls
``verify_large_files(@bundle_root)`` in its ``initialize`` list so a corrupted or swapped ``models/model.pt`` is
refused with a clear error before anything loads it. In the repository (no ``large_files.yml``) it is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

LARGE_FILES_NAME = "large_files.yml"
HASH_TYPE = "sha256"
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".onnx", ".safetensors")


class WeightFileError(RuntimeError):
    """A weight file listed in large_files.yml is missing, outside the bundle, or does not match its hash."""


def file_hash(path: str | os.PathLike, hash_type: str = HASH_TYPE, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (weight files can be larger than memory is comfortable with)."""
    try:
        digest = hashlib.new(hash_type)
    except ValueError:
        raise WeightFileError(f"{path}: unsupported hash_type {hash_type!r}; use sha256") from None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def format_large_files(entries: Iterable[dict]) -> str:
    """Render entries ``{path, url, hash_val, hash_type}`` as MONAI's large_files.yml.

    Each entry is one YAML flow mapping in JSON syntax, so the file reads the same with PyYAML (MONAI's
    ``download_large_files``) and without it (``read_large_files`` falls back to json per entry).
    """
    lines = [
        "# Weight files of this bundle: `python -m monai.bundle download_large_files --bundle_path <bundle>`",
        "# fetches any that are missing; brainsynth.engine.bundle_archive.verify_large_files refuses a hash mismatch.",
    ]
    entries = [{k: str(e[k]) for k in ("path", "url", "hash_val", "hash_type")} for e in entries]
    if not entries:
        return "\n".join(lines + ["large_files: []", ""])
    return "\n".join(lines + ["large_files:"] + [f"  - {json.dumps(e)}" for e in entries] + [""])


def _parse_large_files(text: str) -> dict:
    try:
        import yaml
    except ImportError:  # PyYAML is not a MONAI requirement: read the flow-mapping format written above
        entries, key = [], None
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("large_files:"):
                key = "large_files"
                if stripped.partition(":")[2].strip() == "[]":
                    return {key: []}
            elif stripped.startswith("- ") and key:
                entries.append(json.loads(stripped[2:]))
            else:
                raise ValueError(f"unexpected line {line!r} (install PyYAML to read hand-written YAML)")
        return {key: entries} if key else {}
    return yaml.safe_load(text) or {}


def large_file_entry(bundle_root: str | os.PathLike, relative_path: str, url: str) -> dict:
    path = Path(bundle_root) / relative_path
    return {"path": Path(relative_path).as_posix(), "url": url, "hash_val": file_hash(path), "hash_type": HASH_TYPE}


def read_large_files(bundle_root: str | os.PathLike) -> list[dict]:
    """Entries of ``<bundle_root>/large_files.yml``; an empty list when the bundle has none."""
    listing = Path(bundle_root) / LARGE_FILES_NAME
    if not listing.is_file():
        return []
    try:
        content = _parse_large_files(listing.read_text(encoding="utf-8"))
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError, ValueError
        raise WeightFileError(f"{listing}: cannot be read ({e})") from e
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise WeightFileError(f"{listing}: expected a top-level 'large_files' list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"path", "url", "hash_val"} <= set(e):
            raise WeightFileError(f"{listing}: entry {i} needs path, url and hash_val, got {e!r}")
    return entries


def _inside(root: Path, relative: str) -> Path:
    target = (root / relative).resolve()
    if os.path.commonpath([root.resolve(), target]) != str(root.resolve()):
        raise WeightFileError(f"{root / LARGE_FILES_NAME}: path {relative!r} points outside the bundle")
    return target


def verify_large_files(bundle_root: str | os.PathLike) -> bool:
    """Check every file listed in ``large_files.yml`` exists and matches its hash; raise ``WeightFileError`` if not.

    Returns True (so it can sit in a bundle config's ``initialize`` list). No listing: nothing to check.
    """
    root = Path(bundle_root)
    listing = root / LARGE_FILES_NAME
    if not listing.is_file() and (root / "brainsynth").is_dir():  # an unpacked archive (it vendors the library)
        weights = sorted(p for p in (root / "models").glob("*") if p.suffix in WEIGHT_SUFFIXES)
        unrecorded = [p for p in weights if not Path(str(p) + ".sha256").is_file()]
        if unrecorded:
            raise WeightFileError(
                f"{listing}: missing from this bundle archive, so {', '.join(p.name for p in unrecorded)} cannot be "
                f"verified; download the archive again (or restore its large_files.yml)"
            )
    problems = []
    for e in read_large_files(root):
        path = _inside(root, e["path"])
        if not path.is_file():
            problems.append(
                f"{path}: listed in {listing} but missing; fetch it with "
                f"`python -m monai.bundle download_large_files --bundle_path {root}`"
            )
            continue
        hash_type = e.get("hash_type") or "md5"  # MONAI's default when hash_type is omitted
        actual = file_hash(path, hash_type)
        if actual.lower() != str(e["hash_val"]).lower():
            problems.append(
                f"{path}: {hash_type} is {actual} but {listing} expects {e['hash_val']}; the file is "
                f"corrupt or not the one released with this bundle, refusing to use it"
            )
    if problems:
        raise WeightFileError("weight file check failed:\n  " + "\n  ".join(problems))
    return True

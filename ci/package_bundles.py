"""Package each bundle as a self-contained MONAI bundle archive ``<name>_v<version>.zip``.

    python ci/package_bundles.py                                  # every bundle under bundles/, into dist/
    python ci/package_bundles.py --bundles brats_mri_med_ddpm --models brats_mri_med_ddpm=/tmp/run/models
    python ci/package_bundles.py --demo-weights 1                  # weights from a 1-iteration demo training
    python ci/package_bundles.py --url-base https://example.org/releases   # where weight files will be hosted

The zip holds one top-level folder named after the bundle (MONAI's layout): LICENSE, configs/, docs/, any other
files the bundle tracks in git, models/ when weights are given, large_files.yml listing every weight file with
its url and sha256, and a copy of the shared library as ``<name>/brainsynth/``. ``python -m monai.bundle run``
resolves a config's ``$import brainsynth`` before it puts the bundle root on sys.path, so the copy must be
importable from the current directory: run bundle commands from inside the unpacked folder. The repository keeps
one copy of brainsynth (common/brainsynth); the vendored copy exists only inside archives.

Archives are reproducible: entries are sorted and carry a fixed timestamp, so the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY_DIR = REPO / "common" / "brainsynth"
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "docs/README.md")
# never shipped: run outputs a demo leaves inside the bundle folder, caches, and weights (they come from --models)
EXCLUDED_PARTS = {"__pycache__", ".pytest_cache", "models", "eval", "runs", "outputs", "cache", ".cache"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
ZIP_DATE = (2024, 1, 1, 0, 0, 0)

sys.path.insert(0, str(REPO / "common"))  # the packaging tool itself uses the repository's library
from brainsynth.engine.bundle_archive import (  # noqa: E402
    LARGE_FILES_NAME,
    WEIGHT_SUFFIXES,
    format_large_files,  # noqa: E402
    large_file_entry,
)
from brainsynth.engine.io import atomic_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verify_bundles as vb  # noqa: E402  (bundle discovery, config stacks, workflow runs)
from verify_bundles import discover_bundles  # noqa: E402


class PackagingError(RuntimeError):
    pass


def bundle_version(bundle_dir: Path) -> str:
    meta_path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        version = json.loads(meta_path.read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError) as e:
        raise PackagingError(f"{meta_path}: cannot read the bundle version ({e})") from e
    return str(version)


def archive_name(bundle_dir: Path) -> str:
    return f"{Path(bundle_dir).name}_v{bundle_version(bundle_dir)}.zip"


def _listed_files(folder: Path) -> list[Path]:
    """Files git would commit under ``folder`` (tracked plus untracked-but-not-ignored); a plain walk outside git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
            cwd=folder,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [folder / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in folder.rglob("*")]
    keep = []
    for f in files:
        rel = f.relative_to(folder)
        if f.is_file() and not (set(rel.parts) & EXCLUDED_PARTS) and not f.name.endswith(EXCLUDED_SUFFIXES):
            keep.append(f)
    return sorted(keep)


def weight_files(models_dir: Path) -> list[Path]:
    """Inference weights in a run's models folder; resumable training checkpoints are not part of a release."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise PackagingError(f"{models_dir}: weights folder not found")
    found = sorted(
        p
        for p in models_dir.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("checkpoint")
    )
    if not found:
        raise PackagingError(f"{models_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to package")
    return found


def stage_bundle(
    bundle_dir: Path,
    staging: Path,
    models_dir: Path | None = None,
    url_base: str | None = None,
    library_dir: Path = LIBRARY_DIR,
) -> Path:
    """Lay the bundle out under ``staging/<name>/`` exactly as the archive will hold it; returns that folder."""
    bundle_dir = Path(bundle_dir).resolve()
    missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise PackagingError(f"{bundle_dir}: cannot package, missing {', '.join(missing)}")
    if (bundle_dir / "brainsynth").exists():
        raise PackagingError(
            f"{bundle_dir}/brainsynth: the bundle must not carry its own copy of the library; "
            f"the archive vendors common/brainsynth at build time"
        )
    name, version = bundle_dir.name, bundle_version(bundle_dir)
    root = Path(staging) / name
    for f in _listed_files(bundle_dir):
        dest = root / f.relative_to(bundle_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    for f in _listed_files(Path(library_dir)):
        dest = root / "brainsynth" / f.relative_to(library_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)

    entries = []
    if models_dir is not None:
        base = (url_base or "").rstrip("/")
        for w in weight_files(models_dir):
            rel = Path("models") / w.relative_to(models_dir)
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(w, dest)
            url = f"{base}/{name}_v{version}/{rel.as_posix()}" if base else ""
            entries.append(large_file_entry(root, rel.as_posix(), url))
    (root / LARGE_FILES_NAME).write_text(format_large_files(entries), encoding="utf-8")
    return root


def write_zip(staged_root: Path, zip_path: Path, overwrite: bool = False) -> Path:
    """Zip ``staged_root`` with itself as the one top-level folder; sorted entries, fixed timestamps, atomic."""
    staged_root = Path(staged_root)
    files = sorted(p for p in staged_root.rglob("*") if p.is_file())
    with atomic_path(zip_path, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for f in files:
                arcname = f"{staged_root.name}/{f.relative_to(staged_root).as_posix()}"
                info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, f.read_bytes())
    return Path(zip_path)


def build_archive(
    bundle_dir: Path,
    out_dir: Path,
    models_dir: Path | None = None,
    url_base: str | None = None,
    overwrite: bool = False,
    library_dir: Path = LIBRARY_DIR,
) -> Path:
    """Build ``<out_dir>/<name>_v<version>.zip``. Without ``url_base`` weight urls point at a copy of each weight
    file written beside the zip (``<out_dir>/<name>_v<version>/models/...``), so download_large_files works."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    zip_path = out_dir / archive_name(bundle_dir)
    if zip_path.exists() and not overwrite:
        raise PackagingError(f"{zip_path}: already exists; pass --overwrite to replace it")
    if models_dir is not None and url_base is None:
        url_base = out_dir.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="bundle_stage_") as staging:
        root = stage_bundle(bundle_dir, Path(staging), models_dir, url_base, library_dir)
        if models_dir is not None and url_base == out_dir.resolve().as_uri():
            hosted = out_dir / f"{bundle_dir.name}_v{bundle_version(bundle_dir)}"
            if hosted.exists():
                shutil.rmtree(hosted)
            shutil.copytree(root / "models", hosted / "models")
        return write_zip(root, zip_path, overwrite=overwrite)


def without_repository_command(*args: str) -> tuple[list[str], dict]:
    """``python -S ARGS`` with the installed packages on PYTHONPATH: no ``.pth`` file is processed, so the
    repository's editable brainsynth install is invisible, as on a machine that only has MONAI and the bundle's
    required packages. ``-m`` still puts the current directory first, where an unpacked bundle has its copy."""
    import sysconfig

    paths = sysconfig.get_paths()
    site = [p for p in dict.fromkeys([paths["purelib"], paths["platlib"]]) if p]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(site), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return [sys.executable, "-S", *args], env


def train_demo_weights(bundle_dir: Path, work: Path, iterations: int | None = None) -> Path:
    """Train every train config of the bundle (stages in order) with its demo overlay in a scratch copy under
    ``work`` (``iterations`` per stage, default the demo's full length); returns the scratch models/ folder."""
    configs = vb.classify_configs(bundle_dir)
    scratch = vb.scratch_copy(Path(bundle_dir), Path(work))
    for stack in sorted((vb.config_stack(bundle_dir, t, configs.train) for t in configs.train), key=len):
        stack = stack + configs.demo[:1]
        result = vb.run_workflow(scratch, stack, "train", max_iterations=iterations, timeout=3600)
        if result["returncode"] != 0:
            raise PackagingError(
                f"{bundle_dir.name}: demo training {'+'.join(stack)} failed:\n"
                + "\n".join(result["output"].splitlines()[-20:])
            )
    return scratch / "models"


def _parse_models(pairs: list[str]) -> dict[str, Path]:
    models = {}
    for pair in pairs:
        name, eq, path = pair.partition("=")
        if not eq or not name or not path:
            raise PackagingError(f"--models {pair!r}: expected NAME=DIR")
        models[name] = Path(path)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundles", nargs="*", help="bundle names (default: every bundle under bundles/)")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output folder (default: dist/)")
    parser.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="NAME=DIR",
        help="weights to ship: every .pt/.ts/.onnx in DIR (training checkpoints excluded)",
    )
    parser.add_argument(
        "--url-base", default=None, help="where weight files are hosted: url = URL_BASE/<name>_v<version>/models/<file>"
    )
    parser.add_argument(
        "--demo-weights",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="ITERATIONS",
        help="ship weights from a demo training run in a temporary folder (ITERATIONS per stage; "
        "without a number, the demo's full length) for bundles without --models",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing archives")
    args = parser.parse_args(argv)
    try:
        available = {p.name: p for p in discover_bundles()}
        names = args.bundles or sorted(available)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise PackagingError(f"unknown bundle(s) {unknown}; available: {sorted(available)}")
        models = _parse_models(args.models)
        stray = sorted(set(models) - set(names))
        if stray:
            raise PackagingError(f"--models names {stray} are not among the bundles being packaged {names}")
        with tempfile.TemporaryDirectory(prefix="demo_weights_") as work:
            for name in names:
                weights = models.get(name)
                if weights is None and args.demo_weights is not None:
                    weights = train_demo_weights(available[name], Path(work), args.demo_weights or None)
                path = build_archive(available[name], args.out, weights, args.url_base, args.overwrite)
                print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    except PackagingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several bundles in one Python process.

Every MONAI bundle names its own code package ``scripts`` (configs say ``scripts.<module>.<name>``), and Python keeps
one ``scripts`` per process: after one bundle's configs ran, another bundle's ``scripts.<module>`` would be looked up
in the first one's folder. ``bundle_scripts(bundle_dir)`` makes ``scripts`` mean this bundle's for the duration of a
block (a verifier, a notebook or a server that parses several bundles' configs), then restores what was there.
``sys.modules`` is one per process, so blocks in different threads take turns (a lock held for the block).

``default_bundle_root()`` is every config's ``bundle_root``: the bundle's folder, wherever the command runs from.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

_LOCK = threading.RLock()


def _scripts_modules() -> list[str]:
    return [name for name in sys.modules if name == "scripts" or name.startswith("scripts.")]


@contextlib.contextmanager
def bundle_scripts(bundle_dir: str | os.PathLike) -> Iterator[Path]:
    folder = Path(bundle_dir).resolve()
    if not (folder / "scripts").is_dir():
        raise FileNotFoundError(f"{folder}: no scripts/ folder (is this a bundle's root folder?)")
    with _LOCK:
        saved = {name: sys.modules.pop(name) for name in _scripts_modules()}
        sys.path.insert(0, str(folder))
        try:
            yield folder
        finally:
            sys.path.remove(str(folder))
            for name in _scripts_modules():
                del sys.modules[name]
            sys.modules.update(saved)


def default_bundle_root(argv: list[str] | None = None) -> str:
    """The bundle folder of the configs ``python -m monai.bundle run`` was given (``<bundle>/configs/a.json`` ->
    ``<bundle>``), so a run started from another folder writes into the bundle, never into that folder; ``"."``
    (MONAI's convention) when the configs are not in a bundle's ``configs/`` or the bundle is driven from Python."""
    import ast

    from brainsynth.engine.training import monai_runner_arguments

    parsed = monai_runner_arguments(argv)
    files = parsed[0].get("config_file") if parsed else None
    if not files:
        return "."
    try:
        first = ast.literal_eval(files)[0] if files.startswith("[") else files.split(",")[0]
    except (ValueError, SyntaxError, IndexError):
        return "."
    configs = Path(str(first)).parent
    if configs.name != "configs" or not (configs / "metadata.json").is_file():
        return "."
    return os.path.relpath(configs.parent) if not configs.is_absolute() else str(configs.parent)

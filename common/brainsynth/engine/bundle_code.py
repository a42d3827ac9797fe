"""Several bundles in one Python process.

Every MONAI bundle names its own code package ``scripts`` (configs say ``scripts.<module>.<name>``), and Python keeps
one ``scripts`` per process: after one bundle's configs ran, another bundle's ``scripts.<module>`` would be looked up
in the first one's folder. ``bundle_scripts(bundle_dir)`` makes ``scripts`` mean this bundle's for the duration of a
block (a verifier, a notebook or a server that parses several bundles' configs), then restores what was there.
``sys.modules`` is one per process, so blocks in different threads take turns (a lock held for the block).
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

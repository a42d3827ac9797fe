"""Import a bundle's own code (``bundles/<bundle>/scripts/<module>.py``) in the shared pytest process.

Every MONAI bundle names its code package ``scripts``, so importing ``scripts`` by name would give whichever bundle
came first. Each bundle's package is loaded under its own name instead (``<bundle>_scripts``), with the package
context intact, so the modules' relative imports (``from .latent_sampling import ...``) work as under MONAI's runner.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def bundle_scripts(bundle: str, module: str | None = None) -> ModuleType:
    """The bundle's ``scripts`` package (importable from then on as ``<bundle>_scripts``), or one of its modules."""
    package = f"{bundle}_scripts"
    if package not in sys.modules:
        folder = REPO / "bundles" / bundle / "scripts"
        spec = importlib.util.spec_from_file_location(
            package, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[package] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"{package}.{module}" if module else package)


def monai_run(bundle_dir: Path, run_id: str, configs: list, *args: str, timeout: float = 600):
    """``python -m monai.bundle run RUN_ID --config_file CONFIGS ARGS`` from the bundle folder, one thread, as a
    user runs it; returns the CompletedProcess."""
    import os

    import preforked_runner

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return preforked_runner.run(preforked_runner.bundle_command(run_id, configs, *args), bundle_dir, env, timeout)


def brats2021_folder(tmp_path: Path, cohort_kwargs: dict) -> Path:
    """A user's own BraTS 2021-named folder (``<id>/<id>_t1.nii.gz``..., labels 1 / 2 / 4) without a datalist: the
    simulated cohort in the BraTS 2021 layout, copied without its JSON files."""
    import shutil

    from brainsynth.data import resolve_dataset_dir

    built = resolve_dataset_dir("demo", tmp_path / "cache", **{**cohort_kwargs, "layout": "brats2021"})
    data = tmp_path / "my_data"
    shutil.copytree(built, data, ignore=shutil.ignore_patterns("*.json", ".*"))
    return data

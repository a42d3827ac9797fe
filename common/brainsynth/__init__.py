"""brainsynth: the shared library of the MONAI bundle collection for generative brain MRI.

What more than one bundle uses, and the shared conditioning and deformation layers, grouped by kind; each paper's
own network and pipeline pieces live in its bundle's ``scripts/``.

  conventions    canonical modalities, labels, pathologies and dataset layouts
  conditioning/  how a diffusion network is told what to generate (semantic masks, categorical tokens)
  deformation/   deformation estimation, warping and multi-step deformation in training and sampling
  schedulers/    noise schedules and samplers that MONAI lacks
  metrics/       paired image metrics, distribution metrics and the in-house feature network
  data/          dataset discovery, checks, DICOM input, canonical loading transforms
  cohort/        the physics-based simulated BraTS-like cohort
  engine/        training and I/O infrastructure: EMA, resumable checkpoints, strict overrides, acceleration,
                 previews, atomic writes, archive hash checks
"""

__version__ = "0.2.0"


def lazy_submodules(package: str):
    """A module ``__getattr__`` that imports ``package.<name>`` on first use: bundle configs say only
    ``$import brainsynth``, and importing a package stays cheap (no module pulls in another's heavy dependencies)."""
    import importlib

    def __getattr__(name: str):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{name}":
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise

    return __getattr__


__getattr__ = lazy_submodules(__name__)


def _runner_bundle_on_path() -> None:
    """Under ``python -m monai.bundle run`` given a bundle's configs by path from another folder (e.g. the
    repository root), put that bundle's folder on ``sys.path`` as running inside it would: its configs import its
    own ``scripts`` package (``$import brainsynth`` comes first in every config's imports)."""
    import os
    import sys

    if not sys.argv or not sys.argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        return
    from brainsynth.engine.bundle_code import default_bundle_root

    root = default_bundle_root()  # parses the command line once
    if root != "." and os.path.abspath(root) not in sys.path:
        sys.path.insert(0, os.path.abspath(root))


_runner_bundle_on_path()

"""brainsynth: the shared library of the MONAI bundle collection for generative brain MRI.

Modules (one idea each):
  conventions   canonical modalities, labels, pathologies and dataset layouts
  io            atomic, non-overwriting NIfTI / checkpoint writing; weights-only loading
  data          dataset discovery, validation (``check``), DICOM input, canonical loading transforms
  cohort        the physics-based simulated BraTS-like cohort
  preview       PNG previews of volumes and cohorts
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Bundle configs only say `$import brainsynth`; submodules load on first use (`brainsynth.training...`), so
    # importing the package stays cheap and no module pulls in another's heavy dependencies.
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":
            raise AttributeError(f"module 'brainsynth' has no attribute {name!r}") from None
        raise

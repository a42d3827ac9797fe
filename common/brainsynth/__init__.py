"""brainsynth: the shared library of the MONAI bundle collection for generative brain MRI.

Modules (one idea each):
  conventions   canonical modalities, labels, pathologies and dataset layouts
  io            atomic, non-overwriting NIfTI / checkpoint writing; weights-only loading
  data          dataset discovery, validation (``check``), DICOM input, canonical loading transforms
  cohort        the physics-based simulated BraTS-like cohort
  preview       PNG previews of volumes and cohorts
"""

__version__ = "0.1.0"

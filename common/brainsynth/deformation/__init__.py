"""Deformation layers: a deformation-estimation network, MONAI's Warp and a smoothness penalty (estimation), and
multi-step deformation in training and in every sampling step (mssdm), and diagnostics of the mask estimate that
drives it (diagnostics). Used by D3M; shared by the design card's
choice (deformation layers are the common library). Not here: D3M's dual-stream U-Net (its bundle's scripts/).
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

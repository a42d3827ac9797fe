"""Conditioning layers: how a diffusion network is told what to generate.
semantic_mask: one-hot segmentation mask concatenated to the noisy image at every step (Med-DDPM); categorical:
one cross-attention token per condition with classifier-free guidance (conditional LDM). Each is used by one bundle
today; they live here because the design card makes conditioning layers the shared library. Not here: networks.
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

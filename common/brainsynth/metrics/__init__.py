"""Image-quality measurement: paired (PSNR / SSIM inside a region, Wilcoxon tests; D3M's evaluation, generic to any
paired synthesis), distribution (Frechet distance and MMD on features, MS-SSIM diversity; Med-DDPM and LDM),
feature_network (the in-house 3D pathology / modality network whose features those use) and memorisation
(nearest-training-subject similarity of generated volumes against held-out real ones). Not here: plotting.
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

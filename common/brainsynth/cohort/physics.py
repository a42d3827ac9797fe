"""MR signal of the simulated tissues: spin-echo and inversion-recovery equations, gadolinium, noise, bias.

Relaxation times and proton densities are approximate 3 T literature values (shared/reference/FACTS.md section 6).
A voxel holding several tissues gets the fraction-weighted sum of their signals (partial volume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: tissue -> (T1 ms, T2 ms, proton density); "enhancing" is viable tumour before contrast
TISSUE_PROPERTIES: dict[str, tuple[float, float, float]] = {
    "wm": (830.0, 80.0, 0.70),
    "gm": (1330.0, 110.0, 0.80),
    "csf": (4000.0, 2000.0, 1.00),
    "edema": (1800.0, 250.0, 0.90),
    "necrosis": (2500.0, 500.0, 0.95),
    "enhancing": (1500.0, 130.0, 0.85),
    "lesion": (1400.0, 160.0, 0.85),
}
#: gadolinium T1 relaxivity, 1 / (mM s)
GD_RELAXIVITY_PER_MM_S = 4.5
#: concentration (mM) used to fix the intensity scale: the brightest plausible enhancing tumour
GD_REFERENCE_MM = 0.5


@dataclass(frozen=True)
class Acquisition:
    """Spin echo (``ti`` None) or inversion recovery; times in ms. ``contrast``: acquired after gadolinium."""

    tr: float
    te: float
    ti: float | None = None
    contrast: bool = False

    def signal(
        self, t1: np.ndarray | float, t2: np.ndarray | float, pd: np.ndarray | float, gd_mm: np.ndarray | float = 0.0
    ) -> np.ndarray:
        """Magnitude signal; gadolinium (mM) shortens T1 (1/T1' = 1/T1 + r1 C) on post-contrast sequences."""
        r1 = 1.0 / np.asarray(t1, dtype=np.float64)
        if self.contrast:
            r1 = r1 + GD_RELAXIVITY_PER_MM_S * np.asarray(gd_mm, dtype=np.float64) / 1000.0
        decay = np.exp(-self.te / np.asarray(t2, dtype=np.float64))
        if self.ti is None:
            return pd * (1.0 - np.exp(-self.tr * r1)) * decay
        return pd * np.abs(1.0 - 2.0 * np.exp(-self.ti * r1) + np.exp(-self.tr * r1)) * decay


#: canonical modality -> acquisition (TR, TE, TI in ms, FACTS.md section 6); T1ce is T1w after gadolinium
ACQUISITIONS: dict[str, Acquisition] = {
    "t1w": Acquisition(500.0, 10.0),
    "t1ce": Acquisition(500.0, 10.0, contrast=True),
    "t2w": Acquisition(4000.0, 90.0),
    "flair": Acquisition(9000.0, 100.0, ti=2500.0),
    "pd": Acquisition(3000.0, 10.0),
}


def intensity_scale(modality: str) -> float:
    """Factor that puts the brightest nominal tissue of a sequence at 1000. Acquisitions with the same timing
    (T1w and T1ce) share it, so contrast enhancement shows as brighter tissue, not as a rescaled image; the
    factor is the same for every subject, so intensities stay comparable across pathologies (each subject then
    gets its own scanner gain)."""
    acquisition = ACQUISITIONS[modality]
    twins = [a for a in ACQUISITIONS.values() if (a.tr, a.te, a.ti) == (acquisition.tr, acquisition.te, acquisition.ti)]
    peak = max(
        float(a.signal(t1, t2, pd, GD_REFERENCE_MM if name == "enhancing" else 0.0))
        for a in twins
        for name, (t1, t2, pd) in TISSUE_PROPERTIES.items()
    )
    return 1000.0 / peak


def tissue_signal(modality: str, properties: tuple[float, float, float], gd_mm: np.ndarray | float = 0.0):
    """Signal of one tissue (scalar, or an array where gadolinium varies by voxel), before scaling."""
    t1, t2, pd = properties
    value = ACQUISITIONS[modality].signal(t1, t2, pd, gd_mm)
    return np.float32(value) if np.ndim(value) == 0 else value.astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    real = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)

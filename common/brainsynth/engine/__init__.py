"""Infrastructure every bundle's training and inference uses: training (EMA, crash-safe resumable checkpoints,
strict config overrides, seeding), acceleration, preview PNGs, io (atomic, non-overwriting writes; weights-only
loading), bundle_archive (hash-checked weights), figures (study PNGs: bars, histograms, curves) and study (the
command, commit and machine a result records). Not here: anything that knows a paper.
"""

from brainsynth import lazy_submodules

__getattr__ = lazy_submodules(__name__)

"""Bundle-specific glue for Med-DDPM: input resolution, output writing, evaluation and the downstream experiment.

Everything reusable lives in the shared ``brainsynth`` package; the configs reach these modules with ``_target_``
(run the bundle from its folder, as MONAI's zoo bundles are).
"""

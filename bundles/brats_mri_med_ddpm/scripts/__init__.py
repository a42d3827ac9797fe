"""Med-DDPM's own code (configs reach it as ``scripts.<module>.<name>``; run the bundle from its folder).

mask_augmentation   the paper's new masks: the tumour scaled and moved inside the brain
inputs, outputs, generation   mask resolution and checks, writing generated volumes, batch generation
evaluation, downstream        the paper's image metrics and its downstream segmentation experiment

The one-hot semantic-mask conditioning at every denoising step is a shared layer: brainsynth.conditioning.semantic_mask.
"""

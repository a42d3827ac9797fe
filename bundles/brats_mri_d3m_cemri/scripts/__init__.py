"""D3M's own code (configs reach it as ``scripts.<module>.<name>``; run the bundle from its folder).

dual_stream_unet  the paper's DSIMD network: one encoder, an image decoder and a mask-velocity decoder
slices            2D slice data (slice selection, tumour masks), whole-volume synthesis and its paired evaluation

The multi-step deformation module (MSSDM) it trains and samples with is a shared layer: brainsynth.deformation.
"""

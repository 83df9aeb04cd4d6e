"""Other pruning methods written on the public primitives (:mod:`flowcut_kernels.ops`), as examples.

- :mod:`.visionzip` — VisionZip's dominant and contextual tokens from a vision tower's feature layer.
- :mod:`.fastv` — FastV: drop image tokens inside a decoder-only language model after layer K.
"""

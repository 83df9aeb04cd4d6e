"""HF model families FlowCut patches, one module each, and the generic pruned-encoder loop.

- :mod:`.encoder` — ``encode`` and ``run_pruned``: any family's tower, layer by layer, with the ops.
- :mod:`.registry` — ``flowcut`` / ``remove_flowcut`` dispatch to the family of a model.
- :mod:`.policy`, :mod:`.schedule` — what the loop asks after each layer (FlowCut's adaptive schedule, or a static
  one with counts fixed in advance).
- :mod:`.seams` — every seam with transformers internals, one function each.
- :mod:`.vlm` — the pieces every VLM family's patch shares (placeholders, counts, the stage's forward, install);
  :mod:`.anyres` — those of the anyres families (LLaVA-NeXT, LLaVA-OneVision): the crops' policy and layout.
- :mod:`.tower`, :mod:`.vision`, :mod:`.instance` — what a tower is, the bare-tower patch, and the
  per-instance attribute bookkeeping every patch uses.
- one module per family: :mod:`.clip`, :mod:`.siglip`, :mod:`.vit` (ViT, DINOv2), :mod:`.llava`,
  :mod:`.llava_next`, :mod:`.qwen2_vl`, :mod:`.qwen3_vl`, :mod:`.qwen3_5`, :mod:`.gemma3`, :mod:`.llava_onevision`,
  :mod:`.internvl`.
  A new family is a module that exports a ``FAMILY`` and one ``register`` line below.
"""

from . import clip, gemma3, internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_5, qwen3_vl, siglip, vit
from .registry import register

register(clip.FAMILY)
register(siglip.FAMILY)
register(llava.FAMILY)
register(llava_next.FAMILY)
register(qwen2_vl.FAMILY)
register(qwen2_vl.FAMILY_2_5)
register(qwen3_vl.FAMILY)
register(qwen3_vl.FAMILY_MOE)
register(qwen3_5.FAMILY)
register(gemma3.FAMILY)
register(llava_onevision.FAMILY)
register(vit.FAMILY)
register(vit.FAMILY_DINOV2)
register(internvl.FAMILY)

"""FlowCut for HF Qwen3-VL (``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``) and Qwen3-VL-MoE
(``Qwen3VLMoeForConditionalGeneration`` / ``Qwen3VLMoeModel``: the same tower, a mixture-of-experts language model)
with their ``Qwen3VLProcessor``.

Qwen3-VL is Qwen2-VL's layout (packed patches in 2×2 merge-block order, a merger of m = 4 patches per token, M-RoPE
positions (t, h, w) in the language model), so the patch is :mod:`.qwen2_vl`'s, on the same pieces:

- the tower stage runs in whole merge groups, scored from each block's post-rotary q/k/v (the attention seam), relay
  the image's mean query, no CLS; the tower's learned position embedding, resampled to each grid, is added to the
  patch embeddings first (:func:`.seams.qwen_position_embedding`);
- **DeepStack**: after each of the tower's ``deepstack_visual_indexes`` layers the groups present there are merged by
  that layer's DeepStack merger; every later prune keeps the rows of the groups it keeps, so each kept token carries
  its own group's features of every DeepStack layer (``FlowCutQwenImageFeatures.deepstack_features``). The language
  model adds DeepStack layer i's features to decoder layer i's output at the kept tokens' positions (their
  placeholders), as the stock model does at its visual positions;
- M-RoPE: each kept token keeps its group's (t, h, w) position, text continues from the unpruned sequence's positions;
- with the language-model stage (the default) the tower keeps min(2K, G₀) groups, decoder layers 0 … 1 see them (each
  with its DeepStack features) and layer 1 keeps K by the text-guided score; DeepStack layers after layer 1 add the kept
  tokens' own features. ``llm_stage=False``: the tower keeps K groups.

The processor, when given, writes K_b = min(target_num, G₀_b) placeholders per image, and per video its frames'
shares of K_v = min(target_num, G₀) after their timestamps (videos: :mod:`.qwen2_vl`).
"""

from __future__ import annotations

import functools

from .qwen2_vl import patch_qwen, unpatch_qwen2_vl
from .registry import Family


def classes() -> tuple[type, type]:
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

    return Qwen3VLForConditionalGeneration, Qwen3VLModel


def classes_moe() -> tuple[type, type]:
    from transformers import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel

    return Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeModel


FAMILY = Family(
    "qwen3_vl", classes, functools.partial(patch_qwen, name="Qwen3-VL", processor_class="Qwen3VLProcessor"),
    unpatch_qwen2_vl,
)
FAMILY_MOE = Family(
    "qwen3_vl_moe", classes_moe,
    functools.partial(patch_qwen, name="Qwen3-VL-MoE", processor_class="Qwen3VLProcessor"), unpatch_qwen2_vl,
)

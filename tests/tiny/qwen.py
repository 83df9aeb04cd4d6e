"""Tiny random Qwen2-VL and Qwen2.5-VL for :func:`~tiny.text.tiny_qwen_tokenizer`, and their image-only processors.

Vision: ``depth`` blocks, width 32, 4 heads, 2-pixel patches, 2×2 merge; text: 3 layers, width 32, 4 query and 2
key/value heads, M-RoPE sections (1, 1, 2). The tower's q and k (the fused ``qkv``'s first two thirds) are multiplied
by ``sharpen``. Greedy generation (:func:`~tiny.text.greedy`), never emitting a vision token.
"""

from __future__ import annotations

import torch
from torch import nn

from flowcut_kernels.bench.random_models import seeded_model, sharpen_qwen_attention

from .text import QWEN_WORDS, TINY_WORDS, greedy, image_only, pil_image_processor, tiny_qwen_tokenizer

#: The tiny text model and the token ids of :func:`~tiny.text.tiny_qwen_tokenizer`.
_TEXT = dict(
    text_config=dict(
        vocab_size=len(QWEN_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ),
    image_token_id=QWEN_WORDS.index("<|image_pad|>"),
    video_token_id=QWEN_WORDS.index("<|video_pad|>"),
    vision_start_token_id=QWEN_WORDS.index("<|vision_start|>"),
    vision_end_token_id=QWEN_WORDS.index("<|vision_end|>"),
)


def seeded_qwen(cls, config, seed, sharpen, dtype, device, attn_implementation) -> nn.Module:
    model = seeded_model(cls, config, seed, device, attn_implementation)
    sharpen_qwen_attention(model.model.visual, sharpen)
    return greedy(model, list(range(len(TINY_WORDS), len(QWEN_WORDS)))).to(dtype).eval()


def random_qwen2_vl(
    *,
    seed: int = 0,
    sharpen: float = 4.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    depth: int = 4,
) -> nn.Module:
    """A seeded random ``Qwen2VLForConditionalGeneration`` (module docstring), in eval mode."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(
            depth=depth, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        **_TEXT,
    )
    return seeded_qwen(Qwen2VLForConditionalGeneration, config, seed, sharpen, dtype, device, attn_implementation)


def random_qwen2_5_vl(
    *,
    seed: int = 0,
    sharpen: float = 64.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    depth: int = 4,
    fullatt_block_indexes: tuple[int, ...] = (2,),
) -> nn.Module:
    """A seeded random ``Qwen2_5_VLForConditionalGeneration``, in eval mode.

    As :func:`random_qwen2_vl`, with Qwen2.5-VL's tower: RMSNorm, gated MLP (width 64), 8-pixel windows (2×2 merge
    groups, so the window reorder is not the identity on images wider than 4 patches), full attention in
    ``fullatt_block_indexes``, the others windowed. The RMSNorm'd random patches have a mean query near zero, so the
    q/k factor is larger than Qwen2-VL's: at 64 the tower prunes before its last layer (at layer 1 of 4 on the tests'
    images: 24 → 15 groups, and a window emptied on a 6×10 patch image).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=depth, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=8,
            fullatt_block_indexes=list(fullatt_block_indexes),
        ),
        **_TEXT,
    )
    return seeded_qwen(Qwen2_5_VLForConditionalGeneration, config, seed, sharpen, dtype, device, attn_implementation)


def _processor(processor_class, tokenizer):
    """An image-only ``processor_class``: :func:`~tiny.text.tiny_qwen_tokenizer` and an image processor of 2-pixel
    patches, 2×2 merge, images resized to 16 … 4096 pixels. Needs Pillow."""
    image_processor = pil_image_processor("Qwen2VLImageProcessor")(
        patch_size=2, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16, "longest_edge": 4096}
    )
    return image_only(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer if tokenizer is not None else tiny_qwen_tokenizer()
    )


def tiny_qwen2_vl_processor(tokenizer=None):
    """A stock ``Qwen2VLProcessor`` for :func:`random_qwen2_vl`, image-only (:func:`_processor`)."""
    from transformers import Qwen2VLProcessor

    return _processor(Qwen2VLProcessor, tokenizer)


def tiny_qwen2_5_vl_processor(tokenizer=None):
    """A stock ``Qwen2_5_VLProcessor`` for :func:`random_qwen2_5_vl`, image-only, with the image processor and
    tokenizer of :func:`tiny_qwen2_vl_processor`."""
    from transformers import Qwen2_5_VLProcessor

    return _processor(Qwen2_5_VLProcessor, tokenizer)

"""Tiny seeded LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) and its ``LlavaOnevisionProcessor``.

A SigLIP tower on 32 px crops of 4 px patches (8 × 8 = 64 patches, 6 layers), anyres over the grid resolutions of
``TINY_PINPOINTS`` (base image + 2 to 4 crops), a 2-layer Qwen2 decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from flowcut_kernels.bench.random_models import TINY_PINPOINTS, seeded_model, sharpen_attention

from .text import TINY_WORDS, greedy, image_only, word_tokenizer

#: :data:`TINY_WORDS` then OneVision's image and video tokens.
OV_WORDS = TINY_WORDS + ["<image>", "<video>"]
IMAGE, VIDEO = len(TINY_WORDS), len(TINY_WORDS) + 1


def tiny_onevision_tokenizer():
    """A word-level tokenizer over :data:`OV_WORDS` with OneVision's image and video tokens, left padding."""
    return word_tokenizer(OV_WORDS, extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})


def random_onevision(*, seed: int = 0, sharpen: float = 8.0, dtype=torch.float32, attn_implementation="sdpa",
                     image_grid_pinpoints=None, **config) -> nn.Module:
    """A seeded random ``LlavaOnevisionForConditionalGeneration`` for :func:`tiny_onevision_tokenizer`, eval mode,
    greedy, never emitting image or video tokens, without an end token."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                                image_size=32, patch_size=4, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(OV_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                  video_token_index=VIDEO, image_grid_pinpoints=image_grid_pinpoints or TINY_PINPOINTS,
                                  **config)
    model = seeded_model(LlavaOnevisionForConditionalGeneration, config, seed, "cpu", attn_implementation)
    sharpen_attention(model.model.vision_tower, sharpen)
    return greedy(model, [IMAGE, VIDEO]).to(dtype).eval()


def tiny_onevision_processor(model: nn.Module, tokenizer=None):
    """A stock ``LlavaOnevisionProcessor`` for ``model`` (its crop size and grid resolutions, 64 tokens a crop), built
    without a video processor (whose class needs torchvision): it takes images and text only. Needs Pillow."""
    import transformers
    from transformers import LlavaOnevisionProcessor

    image_processor_class = (getattr(transformers, "LlavaOnevisionImageProcessorPil", None)
                             or transformers.LlavaOnevisionImageProcessor)
    vision = model.config.vision_config
    size = vision.image_size
    return image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor_class(size={"height": size, "width": size},
                                              image_grid_pinpoints=model.config.image_grid_pinpoints),
        tokenizer=tokenizer if tokenizer is not None else tiny_onevision_tokenizer(),
        num_image_tokens=(size // vision.patch_size) ** 2,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )

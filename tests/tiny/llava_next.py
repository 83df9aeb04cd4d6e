"""Tiny random LLaVA-NeXT (CLIP tower with 32 px crops, anyres) for :func:`~tiny.text.tiny_tokenizer`, and its stock
processor."""

from __future__ import annotations

import torch
from torch import nn

from flowcut_kernels.bench.random_models import TINY_PINPOINTS, vision_fields
from .llava import llava_family_processor, seeded_llava
from .text import IMAGE_TOKEN, tiny_llama


def random_llava_next(
    preset: str = "tiny",
    *,
    seed: int = 0,
    sharpen: float = 8.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    image_grid_pinpoints: list | None = None,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    text: dict | None = None,
    **vision_overrides,
) -> nn.Module:
    """A seeded random ``LlavaNextForConditionalGeneration`` (CLIP tower, anyres) for
    :func:`~tiny.text.tiny_tokenizer`, in eval mode.

    Args:
        preset: the CLIP tower's shape (``random_models.PRESETS``; its ``image_size`` is the crop size);
            ``vision_overrides`` replace its fields.
        sharpen: q/k factor of the vision tower (``random_models.sharpen_attention``).
        image_grid_pinpoints: the anyres resolutions, multiples of the crop size (default
            ``random_models.TINY_PINPOINTS``).
        text: LlamaConfig fields replacing the tiny defaults (:func:`~tiny.text.tiny_llama`, 1024 positions).

    Generation: :func:`~tiny.text.greedy`, never emitting ``<image>``.
    """
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_fields(preset, vision_overrides)),
        text_config=tiny_llama(text, max_position_embeddings=1024),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=image_grid_pinpoints or TINY_PINPOINTS,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    return seeded_llava(LlavaNextForConditionalGeneration, config, seed, sharpen, dtype, device, attn_implementation)


def tiny_llava_next_processor(model: nn.Module, tokenizer=None):
    """A stock ``LlavaNextProcessor`` matching ``model`` (a :func:`random_llava_next`):
    :func:`~tiny.text.tiny_tokenizer` and a ``LlavaNextImageProcessor`` with the model's crop size and grid
    resolutions. Before FlowCut it expands ``<image>`` to the stock anyres count (base image, unpadded grid and
    newline tokens). Needs Pillow.
    """
    from transformers import LlavaNextProcessor

    return llava_family_processor(LlavaNextProcessor, "LlavaNextImageProcessor", model, tokenizer, 1,
                                  image_grid_pinpoints=model.config.image_grid_pinpoints)

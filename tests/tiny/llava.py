"""Tiny random LLaVA-1.5 (CLIP or SigLIP tower) for :func:`~tiny.text.tiny_tokenizer`, and its stock processor."""

from __future__ import annotations

import torch
from torch import nn

from flowcut_kernels.bench.random_models import seeded_model, sharpen_attention, vision_fields
from .text import IMAGE_TOKEN, greedy, pil_image_processor, tiny_llama, tiny_tokenizer


def random_llava(
    vision: str = "clip",
    preset: str = "tiny",
    *,
    seed: int = 0,
    sharpen: float = 8.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str | None = None,
    text: dict | None = None,
    **vision_overrides,
) -> nn.Module:
    """A seeded random ``LlavaForConditionalGeneration`` for :func:`~tiny.text.tiny_tokenizer`, in eval mode.

    Args:
        vision: "clip" (LLaVA-1.5's tower, strategy "default") or "siglip" (strategy "full" by default).
        preset: the vision tower's shape (``random_models.PRESETS``); ``vision_overrides`` replace its fields.
        sharpen: q/k factor of the vision tower (``random_models.sharpen_attention``).
        text: LlamaConfig fields replacing the tiny defaults (:func:`~tiny.text.tiny_llama`).

    Generation: :func:`~tiny.text.greedy`, never emitting ``<image>``.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision_config = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision](
        **vision_fields(preset, vision_overrides)
    )
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = "default" if vision == "clip" else "full"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_llama(text),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    return seeded_llava(LlavaForConditionalGeneration, config, seed, sharpen, dtype, device, attn_implementation)


def seeded_llava(cls, config, seed, sharpen, dtype, device, attn_implementation) -> nn.Module:
    """``cls(config)`` with seeded weights (``random_models.seeded_model``), its vision tower's q/k multiplied by
    ``sharpen``, greedy (:func:`~tiny.text.greedy`, never emitting ``<image>``), in ``dtype`` and eval mode."""
    model = seeded_model(cls, config, seed, device, attn_implementation)
    sharpen_attention(model.model.vision_tower, sharpen)
    return greedy(model, [config.image_token_id]).to(dtype).eval()


def tiny_llava_processor(model: nn.Module, tokenizer=None):
    """A stock ``LlavaProcessor`` matching ``model`` (a :func:`random_llava`): :func:`~tiny.text.tiny_tokenizer` and
    a ``CLIPImageProcessor`` at the tower's resolution. Before FlowCut it expands ``<image>`` to all patches (minus
    the CLS drop of the "default" strategy). Needs Pillow.
    """
    from transformers import LlavaProcessor

    cls_token = int(model.config.vision_config.model_type == "clip_vision_model")
    return llava_family_processor(LlavaProcessor, "CLIPImageProcessor", model, tokenizer, cls_token)


def llava_family_processor(processor_class, image_processor, model, tokenizer, num_additional_image_tokens,
                           **image_fields):
    """A stock ``processor_class`` matching ``model``: ``tokenizer`` (default :func:`~tiny.text.tiny_tokenizer`) and
    the Pillow-backed image processor class ``image_processor`` at the tower's crop size, ``image_fields`` added."""
    vision = model.config.vision_config
    size = vision.image_size
    return processor_class(
        image_processor=pil_image_processor(image_processor)(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **image_fields
        ),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=num_additional_image_tokens,
    )

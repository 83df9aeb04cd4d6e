"""Tiny seeded InternVL (``InternVLForConditionalGeneration``) and its ``InternVLProcessor``, built offline.

The tower is a tiny InternViT (32 px tiles, 4 px patches: an 8 × 8 grid of 64 patches and a CLS row, 6 layers, q/k
RMS-normed); the model pixel-shuffles 2 × 2 patches into 16 tokens per tile; the decoder is the tiny Llama of
:func:`.text.tiny_llama`. The processor crops an image into up to 4 tiles of 32² (and a thumbnail when it takes more
than one).
"""

from __future__ import annotations

import torch
from torch import nn

from flowcut_kernels.bench.random_models import seeded_model

from .text import TINY_WORDS, greedy, image_only, pil_image_processor, tiny_llama, word_tokenizer

#: :data:`TINY_WORDS` then InternVL's image tokens: begin, context (the placeholder), end, and the video token.
INTERNVL_WORDS = TINY_WORDS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
START, END, IMAGE, VIDEO = (INTERNVL_WORDS.index(w) for w in INTERNVL_WORDS[-4:])
#: Tokens per tile (8 × 8 patches, pixel-shuffled 2 × 2).
TILE_TOKENS = 16


def tiny_internvl_tokenizer():
    """A word-level tokenizer over :data:`INTERNVL_WORDS` with InternVL's special image tokens, left padding."""
    return word_tokenizer(INTERNVL_WORDS, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    })


def random_internvl(*, seed: int = 0, sharpen: float = 8.0, dtype=torch.float32, attn_implementation="sdpa",
                    **vision) -> nn.Module:
    """A seeded random ``InternVLForConditionalGeneration`` for :func:`tiny_internvl_tokenizer`, in eval mode,
    greedy, never emitting image tokens, without an end token."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision_config = InternVLVisionConfig(**{
        **dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=32,
               patch_size=4, use_qk_norm=True, layer_scale_init_value=1.0),
        **vision,
    })
    config = InternVLConfig(
        vision_config=vision_config, text_config=tiny_llama({"vocab_size": len(INTERNVL_WORDS)}).to_dict(),
        image_token_id=IMAGE, image_seq_length=TILE_TOKENS, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    model = seeded_model(InternVLForConditionalGeneration, config, seed, "cpu", attn_implementation)
    with torch.no_grad():  # the stock CLS row and position embeddings start at zero: give them values
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(std=0.5)
        embeddings.position_embeddings.normal_(std=0.5)
        for layer in model.model.vision_tower.encoder.layer:  # q and k are RMS-normed: sharpen their norms' weights
            layer.attention.q_norm.weight.mul_(sharpen)
            layer.attention.k_norm.weight.mul_(sharpen)
    return greedy(model, [START, END, IMAGE, VIDEO]).to(dtype).eval()


def tiny_internvl_processor(model: nn.Module, tokenizer=None, max_patches: int = 4):
    """A stock ``InternVLProcessor`` (without its video processor) for ``model``: :func:`tiny_internvl_tokenizer`
    and a Pillow GOT-OCR2 image processor cropping to tiles of the tower's side (at most ``max_patches``, and a
    thumbnail); it writes ``image_seq_length`` = 16 context tokens per tile between ``<img>`` and ``</img>``, and the
    prompt marks an image with ``<IMG_CONTEXT>``."""
    from transformers import InternVLProcessor

    side = model.config.vision_config.image_size[0]
    image_processor = pil_image_processor("GotOcr2ImageProcessor")(
        size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=max_patches,
    )
    return image_only(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else tiny_internvl_tokenizer(),
        image_seq_length=model.config.image_seq_length,
    )

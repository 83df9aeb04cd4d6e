"""Tiny seeded Gemma 3 (``Gemma3ForConditionalGeneration``) and its ``Gemma3Processor``, built offline.

The tower is a tiny SigLIP (32 px, 4 px patches: an 8 × 8 grid of 64 patches); the projector pools 2 × 2 windows
into ``mm_tokens_per_image`` = 16 tokens; the decoder has 2 layers (one sliding, one full attention).
"""

from __future__ import annotations

import torch
from torch import nn

from flowcut_kernels.bench.random_models import seeded_model, sharpen_attention

from .text import TINY_WORDS, greedy, word_tokenizer

#: :data:`TINY_WORDS` then Gemma 3's image tokens: begin, soft token (the placeholder), end.
GEMMA_WORDS = TINY_WORDS + ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]
BOI, IMAGE, EOI = (GEMMA_WORDS.index(w) for w in GEMMA_WORDS[-3:])


def tiny_gemma3_tokenizer():
    """A word-level tokenizer over :data:`GEMMA_WORDS` with Gemma 3's special image tokens, left padding."""
    return word_tokenizer(GEMMA_WORDS, extra_special_tokens={"boi_token": GEMMA_WORDS[BOI],
                                                             "image_token": GEMMA_WORDS[IMAGE],
                                                             "eoi_token": GEMMA_WORDS[EOI]})


def random_gemma3(*, seed: int = 0, sharpen: float = 8.0, dtype=torch.float32, attn_implementation="sdpa",
                  mm_tokens_per_image: int = 16, **vision) -> nn.Module:
    """A seeded random ``Gemma3ForConditionalGeneration`` for :func:`tiny_gemma3_tokenizer`, in eval mode, greedy,
    never emitting image tokens, without an end token."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision_config = SiglipVisionConfig(**{
        **dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=32,
               patch_size=4, vision_use_head=False),
        **vision,
    })
    text_config = Gemma3TextConfig(
        vocab_size=len(GEMMA_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    config = Gemma3Config(
        vision_config=vision_config, text_config=text_config, mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
    )
    model = seeded_model(Gemma3ForConditionalGeneration, config, seed, "cpu", attn_implementation)
    with torch.no_grad():  # the stock projection starts at zero: give it weights, so the images matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    sharpen_attention(model.model.vision_tower, sharpen)
    return greedy(model, [BOI, IMAGE, EOI]).to(dtype).eval()


def tiny_gemma3_processor(model: nn.Module, tokenizer=None):
    """A stock ``Gemma3Processor`` for ``model``: :func:`tiny_gemma3_tokenizer` and a Gemma 3 image processor at
    the tower's resolution; it writes ``mm_tokens_per_image`` soft tokens per image (each between ``<start_of_image>``
    and ``<end_of_image>``), and the prompt marks an image with ``<start_of_image>``."""
    import transformers
    from transformers import Gemma3Processor

    image_processor_class = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    size = model.config.vision_config.image_size
    return Gemma3Processor(
        image_processor=image_processor_class(size={"height": size, "width": size}),
        tokenizer=tokenizer if tokenizer is not None else tiny_gemma3_tokenizer(),
        image_seq_length=model.config.mm_tokens_per_image,
    )

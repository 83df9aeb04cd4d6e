"""The tiny models' text side: word-level tokenizers, the tiny Llama text config, greedy generation, the
Pillow-backed image processor classes (recent 5.x name them apart; the default ones want torchvision) and processors
built without their video processor."""

from __future__ import annotations

from typing import ClassVar

import transformers
from torch import nn

#: Words of :func:`tiny_tokenizer`; ids follow this order, ``<image>`` comes last (id 63).
TINY_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(57)]
#: Words of :func:`tiny_qwen_tokenizer`: :data:`TINY_WORDS`, then Qwen2-VL's vision tokens.
QWEN_WORDS = TINY_WORDS + ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
#: The LLaVA families' ``<image>`` id (after every word of :data:`TINY_WORDS`).
IMAGE_TOKEN = len(TINY_WORDS)


def word_tokenizer(words: list[str], **special):
    """An in-memory word-level ``PreTrainedTokenizerFast`` over ``words`` (ids in order), split on whitespace,
    left padding, ``<pad>``/``<unk>``/``<s>``/``</s>`` as its special tokens plus ``special``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left", **special,
    )


def tiny_tokenizer():
    """The LLaVA families' tokenizer: :data:`TINY_WORDS` and ``<image>`` (id 63), a special token, so repeated
    placeholders need no spaces."""
    return word_tokenizer(TINY_WORDS, extra_special_tokens={"image_token": "<image>"})


def tiny_qwen_tokenizer():
    """:func:`tiny_tokenizer`'s words with Qwen2-VL's vision tokens (``<|image_pad|>`` = 63) as special tokens."""
    return word_tokenizer(QWEN_WORDS, additional_special_tokens=QWEN_WORDS[-4:])


def tiny_llama(text: dict | None = None, max_position_embeddings: int = 512):
    """The LLaVA families' ``LlamaConfig``: vocabulary of 64 (:func:`tiny_tokenizer`), hidden 32, 2 layers, 4 query
    and 2 key/value heads; ``text`` replaces fields."""
    return transformers.LlamaConfig(**{
        "vocab_size": IMAGE_TOKEN + 1, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_position_embeddings,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, **(text or {}),
    })


def greedy(model: nn.Module, suppress_tokens: list[int]) -> nn.Module:
    """Greedy generation that pads with ``<pad>``, has no end token (``generate`` always returns
    ``max_new_tokens`` tokens) and never emits ``suppress_tokens`` (a generated placeholder would be an image)."""
    config = model.generation_config
    config.do_sample = False
    config.pad_token_id = 0
    config.eos_token_id = None
    config.suppress_tokens = suppress_tokens
    return model


def pil_image_processor(name: str):
    """transformers' Pillow-backed image processor class ``name`` (``<name>Pil`` in recent 5.x)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def image_only(processor_class):
    """``processor_class`` built without a video processor (whose class needs torchvision): images and text only."""

    class ImageOnly(processor_class):
        attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

        @classmethod
        def get_attributes(cls):
            return cls.attributes

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly

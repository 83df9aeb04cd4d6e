"""Random HF vision models at real shapes with realistic (sharpened) attention.

No weights can be downloaded here, and random weights give near-uniform attention: every
normalised entropy Hn ≈ 1, so FlowCut's schedule would keep everything until the last step.
:func:`sharpen_attention` multiplies each layer's q and k projections (weights and biases) by
``factor``, which multiplies the attention logits by ``factor²`` and concentrates the attention the
way a trained CLIP's does, so the adaptive schedule prunes progressively. Everything is seeded; the
weights come from transformers' own initialisation, so they differ between transformers releases.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from .registry import find_tower

#: CLIP vision shapes: ViT-L/14 at 336 px (LLaVA-1.5's tower: 577 tokens, 24 layers) and a tiny one for tests.
PRESETS = {
    "clip-l-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        image_size=32, patch_size=4, projection_dim=16,
    ),
}

#: q/k factor for CLIP-L-shaped random models: Hn ≈ 0.65–0.75 per layer, so target 64 prunes
#: progressively (577 → 523 → 463 → … → 130 → 65) instead of all at the last step.
DEFAULT_SHARPEN = 16.0


def sharpen_attention(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every layer's q_proj and k_proj (weight and bias) by ``factor``; logits scale by factor²."""
    with torch.no_grad():
        for layer in find_tower(model).layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)
    return model


def random_clip_vision(
    preset: str = "clip-l-336",
    *,
    seed: int = 0,
    sharpen: float = DEFAULT_SHARPEN,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    with_projection: bool = False,
    **overrides,
) -> nn.Module:
    """A seeded random CLIP vision model of ``preset`` shape, built directly on ``device``, in eval mode.

    ``overrides`` replace config fields (e.g. ``num_hidden_layers=2``).
    """
    config = CLIPVisionConfig(**{**PRESETS[preset], **overrides})
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    return _build(cls, config, seed, sharpen, dtype, device, attn_implementation)


def _build(cls, config, seed, sharpen, dtype, device, attn_implementation) -> nn.Module:
    """``cls`` from ``config``: seeded float32 weights made on ``device``, q/k sharpened, cast, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    sharpen_attention(model, sharpen)
    return model.to(dtype).eval()


def random_pixels(
    model: nn.Module, batch: int, *, seed: int = 0, dtype: torch.dtype | None = None
) -> Tensor:
    """(batch, 3, H, W) seeded normal pixels at the model's resolution, on its device and in its dtype."""
    tower = find_tower(model)
    size = tower.core.embeddings.image_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return pixels.to(tower.device, dtype or tower.core.embeddings.patch_embedding.weight.dtype)


def _vision_fields(preset: str, overrides: dict) -> dict:
    fields = {**PRESETS[preset], **overrides}
    fields.pop("projection_dim", None)  # CLIP's projection, absent from SigLIP's config
    return fields


def random_siglip_vision(
    preset: str = "tiny",
    *,
    seed: int = 0,
    sharpen: float = DEFAULT_SHARPEN,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    **overrides,
) -> nn.Module:
    """A seeded random ``SiglipVisionModel`` (no CLS row; attention-pooling head) of ``preset`` shape, in eval mode.

    ``overrides`` replace config fields (e.g. ``vision_use_head=False``).
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**_vision_fields(preset, overrides))
    return _build(SiglipVisionModel, config, seed, sharpen, dtype, device, attn_implementation)


#: Words of :func:`tiny_tokenizer`; ids follow this order, ``<image>`` comes last (id 63).
TINY_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(57)]


def tiny_tokenizer():
    """An in-memory word-level ``PreTrainedTokenizerFast`` (64 ids, ``<image>`` = 63), left padding.

    Words are split on whitespace; ``<image>`` is a special token, so repeated placeholders need no spaces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


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
    """A seeded random ``LlavaForConditionalGeneration`` for :func:`tiny_tokenizer`, in eval mode.

    Args:
        vision: "clip" (LLaVA-1.5's tower, strategy "default") or "siglip" (strategy "full" by default).
        preset: the vision tower's shape (:data:`PRESETS`); ``vision_overrides`` replace its fields.
        sharpen: q/k factor of the vision tower (:func:`sharpen_attention`).
        text: LlamaConfig fields replacing the tiny defaults (vocabulary of 64, hidden 32, 2 layers).

    The generation config is greedy, pads with ``<pad>``, never emits ``<image>`` and has no end token, so
    ``generate`` always returns ``max_new_tokens`` tokens.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    vision_config = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision](
        **_vision_fields(preset, vision_overrides)
    )
    text_config = LlamaConfig(
        **{
            **dict(
                vocab_size=len(TINY_WORDS) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=2, eos_token_id=3,
            ),
            **(text or {}),
        }
    )
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = "default" if vision == "clip" else "full"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=len(TINY_WORDS),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    sharpen_attention(model.model.vision_tower, sharpen)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [config.image_token_id]  # a generated <image> would be a placeholder
    return model.to(dtype).eval()


def tiny_llava_processor(model: nn.Module, tokenizer=None):
    """A stock ``LlavaProcessor`` matching ``model`` (a :func:`random_llava`): :func:`tiny_tokenizer` and a
    ``CLIPImageProcessor`` at the tower's resolution. Before FlowCut it expands ``<image>`` to all patches
    (minus the CLS drop of the "default" strategy). Needs Pillow (transformers' image processors do).
    """
    import transformers
    from transformers import LlavaProcessor

    # Recent 5.x name the PIL-backed processor apart (the default one wants torchvision).
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    vision = model.config.vision_config
    size = vision.image_size
    has_cls = vision.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=image_processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=int(has_cls),
    )


#: Words of :func:`tiny_qwen_tokenizer`: :data:`TINY_WORDS`, then Qwen2-VL's vision tokens.
QWEN_WORDS = TINY_WORDS + ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def tiny_qwen_tokenizer():
    """:func:`tiny_tokenizer`'s word-level vocabulary with Qwen2-VL's vision tokens (``<|image_pad|>`` = 63)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(QWEN_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=QWEN_WORDS[-4:], padding_side="left",
    )


#: The tiny Qwen2(.5)-VL text model and token ids of :func:`tiny_qwen_tokenizer`.
_QWEN_TEXT = dict(
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


def _qwen_model(cls, config, seed, sharpen, dtype, device, attn_implementation) -> nn.Module:
    """``cls`` from ``config``: seeded float32 weights on ``device``, the tower's q and k (the fused ``qkv``'s first
    two thirds) multiplied by ``sharpen``, greedy generation that never emits a vision token, cast, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[: 2 * width].mul_(sharpen)
            block.attn.qkv.bias[: 2 * width].mul_(sharpen)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = list(range(len(TINY_WORDS), len(QWEN_WORDS)))
    return model.to(dtype).eval()


def random_qwen2_vl(
    *,
    seed: int = 0,
    sharpen: float = 4.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    depth: int = 4,
) -> nn.Module:
    """A seeded random ``Qwen2VLForConditionalGeneration`` for :func:`tiny_qwen_tokenizer`, in eval mode.

    Vision: ``depth`` blocks, width 32, 4 heads, 2-pixel patches, 2×2 merge; text: 3 layers, width 32, 4 query and 2
    key/value heads, M-RoPE sections (1, 1, 2). The tower's q and k (the fused ``qkv``'s first two thirds) are
    multiplied by ``sharpen``. Greedy generation config, no end token, never emits a vision token.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(
            depth=depth, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        **_QWEN_TEXT,
    )
    return _qwen_model(Qwen2VLForConditionalGeneration, config, seed, sharpen, dtype, device, attn_implementation)


def tiny_qwen2_vl_processor(tokenizer=None):
    """A ``Qwen2VLProcessor`` for :func:`random_qwen2_vl`: :func:`tiny_qwen_tokenizer` and an image processor of
    2-pixel patches, 2×2 merge, images resized to 16 … 4096 pixels; stock, but built without a video processor (whose
    class needs torchvision): it takes images and text only. Needs Pillow."""
    import transformers
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

        @classmethod
        def get_attributes(cls):
            return cls.attributes

    image_processor_class = (
        getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    )
    image_processor = image_processor_class(
        patch_size=2, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16, "longest_edge": 4096}
    )
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer if tokenizer is not None else tiny_qwen_tokenizer()
    )


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
    """A seeded random ``Qwen2_5_VLForConditionalGeneration`` for :func:`tiny_qwen_tokenizer`, in eval mode.

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
        **_QWEN_TEXT,
    )
    return _qwen_model(Qwen2_5_VLForConditionalGeneration, config, seed, sharpen, dtype, device, attn_implementation)


def tiny_qwen2_5_vl_processor(tokenizer=None):
    """A ``Qwen2_5_VLProcessor`` for :func:`random_qwen2_5_vl`, image-only, with the image processor and tokenizer of
    :func:`tiny_qwen2_vl_processor`. Needs Pillow."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

        @classmethod
        def get_attributes(cls):
            return cls.attributes

    parts = tiny_qwen2_vl_processor(tokenizer)
    return ImageOnlyQwen2_5_VLProcessor(image_processor=parts.image_processor, tokenizer=parts.tokenizer)


#: Grid resolutions of :func:`random_llava_next` at its tiny 32 px crops: LLaVA-NeXT's defaults scaled by 32/336
#: (grids 1×2, 2×1, 2×2, 1×3, 3×1: 3 to 5 crops with the base image).
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


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
    """A seeded random ``LlavaNextForConditionalGeneration`` (CLIP tower, anyres) for :func:`tiny_tokenizer`, in eval
    mode.

    Args:
        preset: the CLIP tower's shape (:data:`PRESETS`; its ``image_size`` is the crop size); ``vision_overrides``
            replace its fields.
        sharpen: q/k factor of the vision tower (:func:`sharpen_attention`).
        image_grid_pinpoints: the anyres resolutions, multiples of the crop size (default :data:`TINY_PINPOINTS`).
        text: LlamaConfig fields replacing the tiny defaults (vocabulary of 64, hidden 32, 2 layers).

    Generation as :func:`random_llava`: greedy, pads with ``<pad>``, never emits ``<image>``, no end token.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    text_config = LlamaConfig(**{
        "vocab_size": len(TINY_WORDS) + 1, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, **(text or {}),
    })
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision_fields(preset, vision_overrides)),
        text_config=text_config,
        image_token_index=len(TINY_WORDS),
        image_grid_pinpoints=image_grid_pinpoints or TINY_PINPOINTS,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    sharpen_attention(model.model.vision_tower, sharpen)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = [config.image_token_id]
    return model.to(dtype).eval()


def tiny_llava_next_processor(model: nn.Module, tokenizer=None):
    """A stock ``LlavaNextProcessor`` matching ``model`` (a :func:`random_llava_next`): :func:`tiny_tokenizer` and a
    ``LlavaNextImageProcessor`` with the model's crop size and grid resolutions. Before FlowCut it expands ``<image>``
    to the stock anyres count (base image, unpadded grid and newline tokens). Needs Pillow.
    """
    import transformers
    from transformers import LlavaNextProcessor

    # Recent 5.x name the PIL-backed processor apart (the default one wants torchvision).
    image_processor_class = (
        getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    )
    vision = model.config.vision_config
    size = vision.image_size
    return LlavaNextProcessor(
        image_processor=image_processor_class(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_grid_pinpoints=model.config.image_grid_pinpoints,
        ),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )

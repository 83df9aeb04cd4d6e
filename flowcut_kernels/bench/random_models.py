"""Random HF vision towers at real shapes with realistic (sharpened) attention, and their pixels.

No weights can be downloaded here, and random weights give near-uniform attention: every normalised entropy
Hn ≈ 1, so FlowCut's schedule would keep everything until the last step. :func:`sharpen_attention` multiplies each
layer's q and k projections (weights and biases) by ``factor``, which multiplies the attention logits by
``factor²`` and concentrates the attention the way a trained CLIP's does, so the adaptive schedule prunes
progressively; :func:`sharpen_qwen_attention` does the same to a Qwen2-VL tower's fused ``qkv``. Everything is
seeded; the weights come from transformers' own initialisation, so they differ between transformers releases.
Every bench preset and scenario builds its towers here (the tests' tiny whole models build on it too).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from ..checks import require
from ..models.registry import find_tower

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

#: LLaVA-NeXT's anyres resolutions at the tiny 32 px crops: its defaults scaled by 32/336 (grids 1×2, 2×1, 2×2, 1×3,
#: 3×1: 3 to 5 crops with the base image).
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def vision_fields(preset: str, overrides: dict | None = None) -> dict:
    """The vision-config fields of ``preset`` with ``overrides``, without CLIP's ``projection_dim`` (absent from
    SigLIP's config and from LLaVA's tower)."""
    fields = {**PRESETS[preset], **(overrides or {})}
    fields.pop("projection_dim", None)
    return fields


def sharpen_attention(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every layer's query and key projections (weight and bias) by ``factor``; logits scale by factor².

    The projections of the attention the tower's patch reads (``find_tower(model).attention(layer)``, or the
    self-attention inside it): ``q_proj`` / ``k_proj`` (CLIP, SigLIP; ViT and DINOv2 on recent transformers) or
    ``query`` / ``key`` (ViT and DINOv2 on transformers 5.0)."""
    tower = find_tower(model)
    with torch.no_grad():
        for layer in tower.layers:
            attention = tower.attention(layer)
            attention = getattr(attention, "attention", attention)
            projs = [getattr(attention, n) for n in ("q_proj", "k_proj", "query", "key") if hasattr(attention, n)]
            require(len(projs) == 2, f"no query/key projections found in {type(attention).__name__}")
            for proj in projs:
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)
    return model


def sharpen_qwen_attention(visual: nn.Module, factor: float) -> nn.Module:
    """Multiply the q and k of every block of a Qwen2(.5)-VL tower (the fused ``qkv``'s first two thirds, weight and
    bias) by ``factor``."""
    with torch.no_grad():
        for block in visual.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[: 2 * width].mul_(factor)
            block.attn.qkv.bias[: 2 * width].mul_(factor)
    return visual


def seeded_model(cls, config, seed: int, device, attn_implementation: str = "sdpa",
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """``cls`` from ``config`` with weights seeded by ``seed``, made directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        return cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)


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
    return _tower(cls, config, seed, sharpen, dtype, device, attn_implementation)


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

    config = SiglipVisionConfig(**vision_fields(preset, overrides))
    return _tower(SiglipVisionModel, config, seed, sharpen, dtype, device, attn_implementation)


def _tower(cls, config, seed, sharpen, dtype, device, attn_implementation) -> nn.Module:
    """``cls`` from ``config``: seeded float32 weights made on ``device``, q/k sharpened, cast, in eval mode."""
    model = seeded_model(cls, config, seed, device, attn_implementation)
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

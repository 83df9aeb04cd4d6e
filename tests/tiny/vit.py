"""Tiny seeded ViT / DINOv2 / DINOv2-with-registers towers (64 patches of 4×4 on 32×32 images, 6 layers, width 32)
with sharpened attention, and pixels for them."""

import torch
from torch import nn

from flowcut_kernels.bench.random_models import sharpen_attention
from flowcut_kernels.models.registry import find_tower

FIELDS = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=4)


def _build(cls, config, seed, sharpen, dtype, attn_implementation, **init):
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32, **init)
    with torch.no_grad():  # random, not zero, CLS and registers (their init is zero in DINOv2)
        for name, param in model.embeddings.named_parameters():
            if name in ("cls_token", "register_tokens"):
                param.normal_(0.0, 1.0)
    return sharpen_attention(model, sharpen).to(dtype).eval()


def vit(seed=0, sharpen=16.0, dtype=torch.float32, attn_implementation="sdpa", pooler=True, **overrides):
    """A ``ViTModel`` (with its pooler unless ``pooler=False``)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(**{**FIELDS, "intermediate_size": 64, **overrides})
    return _build(ViTModel, config, seed, sharpen, dtype, attn_implementation, add_pooling_layer=pooler)


def dinov2(seed=0, sharpen=16.0, dtype=torch.float32, attn_implementation="sdpa", registers=0, **overrides):
    """A ``Dinov2Model``, or with ``registers`` > 0 a ``Dinov2WithRegistersModel`` with that many registers."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    fields = {**FIELDS, "mlp_ratio": 2, "layerscale_value": 0.5, **overrides}
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **fields)
        return _build(Dinov2WithRegistersModel, config, seed, sharpen, dtype, attn_implementation)
    return _build(Dinov2Model, Dinov2Config(**fields), seed, sharpen, dtype, attn_implementation)


def pixels(model: nn.Module, batch: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """(batch, 3, size, size) seeded normal pixels in the model's dtype."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(find_tower(model).dtype)

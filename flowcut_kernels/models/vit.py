"""ViT and DINOv2 vision towers (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``): the CLS variant.

Row 0 is the CLS relay token; DINOv2 with registers puts its R register tokens in rows 1 … R, which run
through every layer and stay to the end but are neither scored nor candidates. Layer 0's input is
``embeddings(pixels)``. Their layers are the stock modules, run whole (a pruning layer prunes after its
MLP; the kept rows are the same as when pruning before it). Patched with the shared vision-model patch
(:mod:`.vision`); the patched forward ends with the stock ``layernorm`` and pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import seams
from .registry import Family
from .tower import Tower
from .vision import patch_vision_model, unpatch_vision_model


@dataclass(frozen=True)
class ViTTower(Tower):
    """A ViT tower: layers where :func:`~.seams.vit_layers` finds them, the final ``layernorm`` and ``pooler``."""

    splits_layers = False

    @property
    def layers(self) -> nn.ModuleList:
        return seams.vit_layers(self.core)

    @property
    def num_patches(self) -> int:
        return self.core.embeddings.patch_embeddings.num_patches

    @property
    def device(self) -> torch.device:
        return self.core.embeddings.patch_embeddings.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.core.embeddings.patch_embeddings.projection.weight.dtype

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """(B, 3, H, W) pixels → (B, 1 + N₀, C), in the model's dtype as the stock forward casts them."""
        return self.core.embeddings(pixel_values.to(self.dtype), interpolate_pos_encoding=interpolate_pos_encoding)

    attention = staticmethod(seams.vit_attention)
    run_layer = staticmethod(seams.run_vit_layer)

    def pool(self, last: Tensor) -> tuple[Tensor, Tensor | None]:
        """``layernorm(last)`` and the pooler on its CLS row (None for a model built without pooler)."""
        last = self.core.layernorm(last)
        return last, (self.core.pooler(last) if self.core.pooler is not None else None)


@dataclass(frozen=True)
class Dinov2Tower(ViTTower):
    """A DINOv2 tower (with or without registers): position embeddings interpolated to any image size by the
    embeddings themselves; pooled output = the CLS row after ``layernorm``."""

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """(B, 3, H, W) pixels → (B, 1 + R + N, C): CLS row, registers, patches."""
        return self.core.embeddings(pixel_values.to(self.dtype))

    def pool(self, last: Tensor) -> tuple[Tensor, Tensor]:
        last = self.core.layernorm(last)
        return last, last[:, 0]


def vit_classes() -> tuple[type, ...]:
    from transformers import ViTModel

    return (ViTModel,)


def dinov2_classes() -> tuple[type, ...]:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2Model, Dinov2WithRegistersModel


def dinov2_tower(model: nn.Module) -> Dinov2Tower:
    """The model's tower; ``num_register_tokens`` rows after the CLS row for DINOv2 with registers."""
    return Dinov2Tower(model, has_cls=True, num_registers=int(getattr(model.config, "num_register_tokens", 0)))


# Bare towers only: a LLaVA model with one of these towers is refused (untested there; LLaVA's "default" strategy
# would also take DINOv2's registers for patches).
FAMILY = Family("vit", vit_classes, patch_vision_model, unpatch_vision_model, tower=lambda model: ViTTower(model),
                in_llava=False)
FAMILY_DINOV2 = Family("dinov2", dinov2_classes, patch_vision_model, unpatch_vision_model, tower=dinov2_tower,
                       in_llava=False)

"""Where FlowCut finds things in a HuggingFace vision tower.

A :class:`Tower` names the module that embeds the image and holds the encoder layers (the
"core": the model itself in recent transformers 5.x, its ``vision_model`` in early 5.x)
and how to reach each layer's attention projections.

- CLIP (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``): a CLS row first, so the CLS variant of
  SPEC.md; layer 0's input is ``pre_layrnorm(embeddings(pixels))``.
- SigLIP (``SiglipVisionModel``): no CLS row, so the mean-query variant; layer 0's input is
  ``embeddings(pixels)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import FlowCutInputError

SUPPORTED = "CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel"


@dataclass(frozen=True)
class Tower:
    """A vision tower seen by FlowCut.

    core: the module with ``embeddings``, ``encoder.layers`` and ``post_layernorm`` (CLIP also ``pre_layrnorm``).
    has_cls: row 0 is a CLS relay token (CLS variant of SPEC.md); otherwise the mean-query variant.
    """

    core: nn.Module
    has_cls: bool = True

    @property
    def layers(self) -> nn.ModuleList:
        return self.core.encoder.layers

    @property
    def num_patches(self) -> int:
        return self.core.embeddings.num_patches

    @property
    def device(self) -> torch.device:
        return self.core.embeddings.patch_embedding.weight.device

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """(B, 3, H, W) pixels → (B, S, C) input of layer 0 (S = 1 + patches with CLS, patches without)."""
        hidden = self.core.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        pre = getattr(self.core, "pre_layrnorm", None)  # CLIP only
        return pre(hidden) if pre is not None else hidden

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        """The layer's attention: ``q_proj``/``k_proj``/``v_proj``, ``num_heads``, ``head_dim``, ``scale``."""
        return layer.self_attn


def _clip_classes() -> tuple[type, ...]:
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    return CLIPVisionModel, CLIPVisionModelWithProjection


def _siglip_classes() -> tuple[type, ...]:
    from transformers import SiglipVisionModel

    return (SiglipVisionModel,)


def is_tower(model) -> bool:
    """Whether ``model`` is a vision model :func:`find_tower` accepts."""
    return isinstance(model, _clip_classes() + _siglip_classes())


def find_tower(model: nn.Module, argument: str = "model") -> Tower:
    """The :class:`Tower` of a supported model, or a FlowCutInputError naming what is supported."""
    if not is_tower(model):
        raise FlowCutInputError(
            f"{argument} is a {type(model).__name__}, which FlowCut does not support; pass one of {SUPPORTED}"
        )
    core = model
    while not hasattr(core, "encoder"):  # early 5.x nests the core as .vision_model
        core = core.vision_model
    return Tower(core, has_cls=isinstance(model, _clip_classes()))

"""Where FlowCut finds things in a HuggingFace vision tower.

A :class:`Tower` names the module that embeds the image and holds the encoder layers (the
"core": ``CLIPVisionModel`` itself in recent transformers 5.x, its ``vision_model`` in early 5.x)
and how to reach each layer's attention projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import FlowCutInputError

SUPPORTED = "CLIPVisionModel, CLIPVisionModelWithProjection"


@dataclass(frozen=True)
class Tower:
    """A vision tower seen by FlowCut.

    core: the module with ``embeddings``, ``pre_layrnorm`` and ``encoder.layers``.
    has_cls: row 0 is a CLS relay token (CLS variant of SPEC.md).
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
        """(B, 3, H, W) pixels → (B, S, C) input of layer 0."""
        hidden = self.core.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.core.pre_layrnorm(hidden)

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        """The layer's attention: ``q_proj``/``k_proj``/``v_proj``, ``num_heads``, ``head_dim``, ``scale``."""
        return layer.self_attn


def _clip_classes() -> tuple[type, ...]:
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    return CLIPVisionModel, CLIPVisionModelWithProjection


def find_tower(model: nn.Module, argument: str = "model") -> Tower:
    """The :class:`Tower` of a supported model, or a FlowCutInputError naming what is supported."""
    if not isinstance(model, _clip_classes()):
        raise FlowCutInputError(
            f"{argument} is a {type(model).__name__}, which FlowCut does not support; pass one of {SUPPORTED}"
        )
    core = model
    while not hasattr(core, "pre_layrnorm"):  # early 5.x nests the core as .vision_model
        core = core.vision_model
    return Tower(core)

"""How FlowCut sees a HuggingFace vision tower: the module that embeds and holds the layers.

A :class:`Tower` names the "core" module (the model itself in recent transformers 5.x, its
``vision_model`` in early 5.x) and whether row 0 is a CLS relay token. Each family module
(``clip.py``, ``siglip.py``) builds one for its classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Tower:
    """A vision tower seen by FlowCut.

    core: the module with ``embeddings``, ``encoder.layers`` and ``post_layernorm`` (CLIP also ``pre_layrnorm``).
    has_cls: row 0 is a CLS relay token (CLS variant of docs/semantics.md); otherwise the mean-query variant.
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

    @property
    def dtype(self) -> torch.dtype:
        return self.core.embeddings.patch_embedding.weight.dtype

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """(B, 3, H, W) pixels → (B, S, C) input of layer 0 (S = 1 + patches with CLS, patches without)."""
        hidden = self.core.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        pre = getattr(self.core, "pre_layrnorm", None)  # CLIP only
        return pre(hidden) if pre is not None else hidden

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        """The layer's attention: ``q_proj``/``k_proj``/``v_proj``, ``num_heads``, ``head_dim``, ``scale``."""
        return layer.self_attn


def core_of(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder`` (early 5.x nests it as ``.vision_model``)."""
    core = model
    while not hasattr(core, "encoder"):
        core = core.vision_model
    return core

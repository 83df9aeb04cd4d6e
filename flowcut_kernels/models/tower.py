"""How FlowCut sees a HuggingFace vision tower: the module that embeds and holds the layers.

A :class:`Tower` names the "core" module (the model itself in recent transformers 5.x, its
``vision_model`` in early 5.x), whether row 0 is a CLS relay token, and how many register rows follow it
(never scored, never pruned). Each family module (``clip.py``, ``siglip.py``, ``vit.py``) builds one for its
classes; ``vit.py`` subclasses it for layers laid out differently.
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
    num_registers: R register rows 1 … R after the CLS row (DINOv2 with registers): they run through every layer
        and stay to the end, but are neither scored nor candidates (the scores see the CLS row and the patches).
    """

    core: nn.Module
    has_cls: bool = True
    num_registers: int = 0

    #: Whether a pruning layer may run as its attention half, the prune, then its MLP half on the kept rows
    #: (``layer_norm1``/``self_attn`` and ``layer_norm2``/``mlp``); otherwise the layer runs whole, then prunes.
    splits_layers = True

    @property
    def prefix(self) -> int:
        """Rows before the first patch: the CLS row and the registers."""
        return int(self.has_cls) + self.num_registers

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

    @staticmethod
    def run_layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None, **kwargs) -> Tensor:
        """One whole layer: (B, S, C) → (B, S, C), ``mask`` (B, 1, 1, S) additive or None."""
        return layer(hidden, mask, **kwargs)

    def pool(self, last: Tensor) -> tuple[Tensor, Tensor | None]:
        """The stock model's last_hidden_state and pooler_output from the feature layer's output ``last`` (B, S, C).

        CLIP: ``last`` as it is and the post-layernormed CLS row. SigLIP: ``last`` post-layernormed, and the
        attention-pooling head on it (None for a model without head).
        """
        if self.has_cls:
            return last, self.core.post_layernorm(last[:, 0])
        last = self.core.post_layernorm(last)
        return last, (self.core.head(last) if getattr(self.core, "use_head", False) else None)


def core_of(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder`` (early 5.x nests it as ``.vision_model``)."""
    core = model
    while not hasattr(core, "encoder"):
        core = core.vision_model
    return core

"""The patch shared by bare vision towers (CLIP, SigLIP, ViT, DINOv2): a pruned ``forward`` on one instance.

The patch is an instance attribute ``forward`` plus ``model.flowcut_config``; the class and every
other instance stay untouched, and :func:`unpatch_vision_model` restores the instance exactly.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, require
from .encoder import check_pixels, check_target, feature_index, run_pruned
from .instance import restore_attrs, returned, set_attrs
from .policy import FlowCutPolicy
from .schedule import StaticPolicy, check_schedule
from .registry import FlowCutConfig, find_tower
from .seams import BaseModelOutputWithPooling, CLIPVisionModelOutput


@dataclass
class FlowCutVisionOutput(BaseModelOutputWithPooling):
    r"""Output of a patched ``CLIPVisionModel``, ``SiglipVisionModel``, ``ViTModel``, ``Dinov2Model`` or
    ``Dinov2WithRegistersModel``.

    last_hidden_state: CLIP: (B, 1 + target_num, C) output of the feature layer on the kept tokens, CLS row
        first. SigLIP: (B, target_num, C) the same output after ``post_layernorm``, as the stock model's.
        ViT, DINOv2: (B, 1 + R + target_num, C) after the final ``layernorm``: the CLS row, the R registers
        (DINOv2 with registers; R = 0 otherwise), then the kept patches.
    pooler_output: CLIP: (B, C) post-layernorm CLS row. SigLIP: (B, C) the attention-pooling head on
        ``last_hidden_state`` (None for a model without head). ViT: its pooler on the CLS row (None without
        one); DINOv2: the CLS row of ``last_hidden_state``.
    hidden_states: (with output_hidden_states) the embeddings and each run layer's output, before that
        layer's pruning — token counts shrink along the tuple.
    keep_indices: (B, target_num) int64 ascending original patch indices of the kept patches.
    tokens_per_layer: tokens each run layer 0 … F processed.
    """

    keep_indices: Tensor | None = None
    tokens_per_layer: list[int] | None = None


@dataclass
class FlowCutVisionProjectionOutput(CLIPVisionModelOutput):
    r"""Output of a patched ``CLIPVisionModelWithProjection``: ``image_embeds`` (B, P) projected from the
    pooled CLS row, and the fields of :class:`FlowCutVisionOutput` except the pooled row."""

    keep_indices: Tensor | None = None
    tokens_per_layer: list[int] | None = None


def _pruned_forward(
    self: nn.Module,
    pixel_values: Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    output_hidden_states: bool | None = None,
    output_attentions: bool | None = None,
    return_dict: bool | None = None,
    **kwargs,
):
    """The patched forward: FlowCut pruning, then the model's usual pooling (and projection)."""
    config: FlowCutConfig = self.flowcut_config
    tower = find_tower(self)
    require(pixel_values is not None, "pixel_values is required: pass (B, 3, H, W) images")
    check_pixels(pixel_values, tower)
    if output_attentions or (output_attentions is None and self.config.output_attentions):
        raise FlowCutInputError(
            "output_attentions=True is unavailable on a FlowCut-patched model: it never builds the attention "
            "matrix; call flowcut_kernels.remove_flowcut(model) first"
        )
    hidden = tower.embed(pixel_values, interpolate_pos_encoding)
    target_num = check_target(config.target_num, hidden.shape[1] - tower.prefix)
    feature_idx = len(tower.layers) + config.feature_layer
    backend = ops.resolve_backend(config.backend, tower.device, tower.dtype)
    if output_hidden_states is None:
        output_hidden_states = self.config.output_hidden_states
    states = [hidden] if output_hidden_states else None

    if config.schedule is not None:
        check_schedule(config.schedule, tower, feature_idx, target_num)  # the same tower; the image size may differ
        policy = StaticPolicy(config.schedule, tower.has_cls)
    else:
        policy = FlowCutPolicy(target_num, tower.has_cls)
    last, keep_indices, tokens = run_pruned(tower, hidden, policy, feature_idx, backend, states, **kwargs)

    last, pooled = tower.pool(last)
    fields = dict(
        last_hidden_state=last,
        hidden_states=tuple(states) if states else None,
        keep_indices=keep_indices,
        tokens_per_layer=tokens,
    )
    if hasattr(self, "visual_projection"):
        out = FlowCutVisionProjectionOutput(image_embeds=self.visual_projection(pooled), **fields)
    else:
        out = FlowCutVisionOutput(pooler_output=pooled, **fields)
    return returned(self, out, return_dict)


def patch_vision_model(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
):
    """Check, then patch a bare vision model (``processor`` is accepted and left untouched)."""
    require(not llm_stage, f"llm_stage=True needs a language model; a {type(model).__name__} has none: leave it unset")
    tower = find_tower(model)
    if feature_layer is None:
        feature_layer = -1
    feature_idx = feature_index(feature_layer, len(tower.layers))
    target_num = check_target(target_num, tower.num_patches)
    check_schedule(schedule, tower, feature_idx, target_num)
    ops.resolve_backend(backend, tower.device, tower.dtype)
    set_attrs(
        model,
        forward=types.MethodType(_pruned_forward, model),
        flowcut_config=FlowCutConfig(target_num, feature_layer, backend, schedule=schedule),
    )


unpatch_vision_model = restore_attrs

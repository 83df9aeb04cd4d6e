"""``flowcut(model, target_num)`` makes one HF vision model instance prune; ``remove_flowcut`` undoes it.

The patch is an instance attribute ``forward`` (the class and every other instance stay untouched)
plus ``model.flowcut_config``; removing both restores the model exactly (no weight is changed).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

from . import ops
from .checks import FlowCutInputError, require
from .encoder import check_pixels, check_target, feature_index, run_pruned
from .towers import find_tower

_NO_PRIOR = object()


@dataclass(frozen=True)
class FlowCutConfig:
    """What a patched model does: keep ``target_num`` patches at layer F = L + ``feature_layer``."""

    target_num: int
    feature_layer: int
    backend: str


@dataclass
class FlowCutVisionOutput(BaseModelOutputWithPooling):
    r"""Output of a patched ``CLIPVisionModel``.

    last_hidden_state: (B, 1 + target_num, C) output of the feature layer on the kept tokens, CLS row first.
    pooler_output: (B, C) post-layernorm CLS row of it.
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
    target_num = check_target(config.target_num, hidden.shape[1] - 1)
    feature_idx = len(tower.layers) + config.feature_layer
    backend = ops.resolve_backend(config.backend, tower.device)
    if output_hidden_states is None:
        output_hidden_states = self.config.output_hidden_states
    states = [hidden] if output_hidden_states else None

    last, keep_indices, tokens = run_pruned(tower, hidden, target_num, feature_idx, backend, states, **kwargs)

    pooled = tower.core.post_layernorm(last[:, 0])
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
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def flowcut(
    model: nn.Module,
    target_num: int,
    *,
    feature_layer: int | None = None,
    backend: str = "auto",
    processor=None,
) -> nn.Module:
    """Make ``model`` prune its visual tokens with FlowCut; returns the same model.

    Args:
        model: a HF ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` (this instance only is patched).
        target_num: patches kept at the feature layer, 1 ≤ target_num < N₀.
        feature_layer: negative index of the feature layer (default -1, the last layer). Layers after
            it are not run, and the output's ``last_hidden_state`` is its output.
        backend: "auto" or a name from :func:`flowcut_kernels.available_backends`, resolved at each
            forward for the model's device.
        processor: not needed for CLIP vision models (their image processor does not depend on the
            token count); accepted and left untouched.

    The patched forward returns a :class:`FlowCutVisionOutput` (``CLIPVisionModel``) or a
    :class:`FlowCutVisionProjectionOutput` (``CLIPVisionModelWithProjection``); the kept indices are
    its ``keep_indices``. Applying again replaces the settings; :func:`remove_flowcut` undoes it.
    Bad arguments raise :class:`~flowcut_kernels.FlowCutInputError` and leave the model unchanged.
    """
    tower = find_tower(model)
    if feature_layer is None:
        feature_layer = -1
    feature_index(feature_layer, len(tower.layers))
    target_num = check_target(target_num, tower.num_patches)
    ops.resolve_backend(backend, tower.device)

    if not hasattr(model, "flowcut_config"):
        model._flowcut_prior_forward = model.__dict__.get("forward", _NO_PRIOR)
        model.forward = types.MethodType(_pruned_forward, model)
    model.flowcut_config = FlowCutConfig(target_num, feature_layer, backend)
    return model


def remove_flowcut(model: nn.Module) -> nn.Module:
    """Undo :func:`flowcut` on ``model`` (a no-op on an unpatched model); returns the same model."""
    if hasattr(model, "flowcut_config"):
        prior = model.__dict__.pop("_flowcut_prior_forward")
        del model.forward
        if prior is not _NO_PRIOR:
            model.forward = prior
        del model.flowcut_config
    return model


__all__ = ["FlowCutConfig", "FlowCutVisionOutput", "FlowCutVisionProjectionOutput", "flowcut", "remove_flowcut"]

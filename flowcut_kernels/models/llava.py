"""FlowCut for HF LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``) and its ``LlavaProcessor``.

The patch replaces two methods on the one ``LlavaModel`` instance (never on its class):

- ``get_image_features``: runs the vision tower's layers 0 … F with FlowCut pruning (F = L +
  ``vision_feature_layer``; later layers are not run), each image on its own schedule (docs/semantics.md's batch
  maximum taken over that image alone, so that a prompt's output does not depend on what it is batched
  with, as ``generate`` users expect), drops the CLS row (CLIP towers), and applies the
  model's own ``multi_modal_projector``. It returns what the stock method returns in transformers 5.x: an
  output whose ``pooler_output`` is the list of per-image projected features, here (target_num, C_text)
  each. ``forward`` and ``generate`` (which in recent 5.x pre-encodes the images through
  ``model.base_model.get_image_features``) both reach it.
- ``get_placeholder_mask``: the stock check, preceded by one that names the fix when the prompt's
  image-token count is not ``target_num`` per image (a processor that still expands ``<image>`` to the
  unpruned count).

With ``llm_stage=True`` (docs/semantics.md, the language-model stage) the tower keeps 2·target_num tokens per image
and a third method is replaced:

- ``forward``: a call whose prompts hold images (a prefill) runs :func:`.lm_stage.prefill`: the language model's
  layers 0 and 1 see each image's 2·target_num features in place of its target_num placeholders, layer 1 keeps
  target_num of them, text-guided, and the later layers and the cache see the prompt's own layout. Other calls
  (decode steps, text-only prompts) are the stock forward. The prompts keep target_num placeholders per image, so
  ``generate`` sees the final length; recent 5.x ``generate`` is made to pass the pixels to that prefill instead of
  pre-encoding them (``_supports_mm_encoder_outputs`` on the outer model, as 5.0 does): its pre-encoded path pairs
  features with placeholders by count, and the stage has more features than placeholders. The outer model's
  ``_expand_inputs_for_generation`` (beams, several sequences) then repeats each prompt's images as a group.

The processor, when given, is made to expand each ``<image>`` to ``target_num`` placeholders, for any
target: its count is ``(height // patch_size) · (width // patch_size) + num_additional_image_tokens``
(− 1 with the "default" strategy) in every 5.x release, so ``patch_size`` is set above any image size
(the product is 0) and ``num_additional_image_tokens`` carries the count. Both values are restored by
:func:`unpatch_llava`.

Towers: CLIP (CLS variant, strategy "default": the CLS row is dropped as in stock LLaVA-1.5) and SigLIP
(mean-query variant, no CLS row: all target_num kept tokens reach the projector, with either strategy;
stock LLaVA would drop SigLIP's first patch under "default", which only makes sense for a CLS row).
Features are the feature layer's raw output, as stock LLaVA takes ``hidden_states[vision_feature_layer]``
(no post-layernorm).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, require
from . import seams
from .encoder import PACKED_OPS, check_pixels, check_target, run_pruned
from .instance import restore_patch, returned
from .policy import FlowCutPolicy
from .registry import Family, FlowCutConfig
from .schedule import StaticPolicy, check_schedule
from .vlm import (
    check_feature_layer,
    check_processor_class,
    check_rest,
    expand_by_prompt,
    install,
    llava_tower,
    requested_layer,
)


@dataclass
class FlowCutImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched LLaVA's ``get_image_features`` returns.

    last_hidden_state: (B, T, C_vision) output of the feature layer on the kept tokens (T = 1 + target_num
        with the CLS row first for CLIP towers, target_num for SigLIP).
    pooler_output: list of B tensors (target_num, C_text): the projected features, one per image, as the
        stock method returns them (2·target_num each with ``llm_stage``: the tower stage's).
    hidden_states: (with output_hidden_states) one tuple per image: its embeddings (1, S₀, C_vision) and each
        run layer's output before that layer's pruning (token counts shrink along it, per image).
    keep_indices: (B, target_num) int64 ascending original patch indices of the kept patches.
    tokens_per_layer: one list per image: the tokens each run layer 0 … F processed.

    Each image is pruned on its own schedule (docs/semantics.md with a batch of one), so the features of an image
    do not depend on the other images of the batch, and batched prompts give their single-prompt results.
    """

    keep_indices: Tensor | None = None
    tokens_per_layer: list[int] | None = None


def classes() -> tuple[type, type]:
    from transformers import LlavaForConditionalGeneration, LlavaModel

    return LlavaForConditionalGeneration, LlavaModel


def is_llava(model) -> bool:
    """Whether ``model`` is a ``LlavaForConditionalGeneration`` or a ``LlavaModel``."""
    return isinstance(model, classes())


def llava_core(model: nn.Module) -> nn.Module:
    """The ``LlavaModel`` of a ``LlavaForConditionalGeneration`` (or the ``LlavaModel`` itself)."""
    return model.model if isinstance(model, classes()[0]) else model


def _pruned_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    image_sizes: Tensor | None = None,
    **kwargs,
):
    """Patched ``LlavaModel.get_image_features``: (B, 3, H, W) pixels → B projected (target_num, C_text) features.

    Returns a :class:`FlowCutImageFeatures` (a tuple with ``return_dict=False``), like the stock method.
    """
    config = self.flowcut_config
    tower = llava_tower(self)
    feature_layer = requested_layer(self, tower, vision_feature_layer, vision_feature_select_strategy)
    require(
        image_sizes is None,
        "image_sizes is not supported by FlowCut's LLaVA patch (LLaVA-1.5 takes fixed-size images); leave it unset",
    )
    return_dict = kwargs.pop("return_dict", None)
    output_hidden_states = kwargs.pop("output_hidden_states", None)
    if kwargs.pop("output_attentions", None):
        raise FlowCutInputError(
            "output_attentions=True is unavailable on a FlowCut-patched vision tower: it never builds the attention "
            "matrix; call flowcut_kernels.remove_flowcut(model) first"
        )
    interpolate = bool(kwargs.pop("interpolate_pos_encoding", False))
    require(pixel_values is not None, "pixel_values is required: pass (B, 3, H, W) images")
    if isinstance(pixel_values, Tensor):  # as the stock tower's forward would, under a device map
        pixel_values = pixel_values.to(tower.device)
    check_pixels(pixel_values, tower)

    hidden = tower.embed(pixel_values, interpolate)
    target_num = check_target(config.tower_target, hidden.shape[1] - int(tower.has_cls))
    backend = ops.resolve_backend(config.backend, tower.device, tower.dtype, PACKED_OPS)
    feature_idx = len(tower.layers) + feature_layer
    # Each image on its own schedule (docs/semantics.md, "Batches"), all images in one tower pass: a prompt's
    # result never depends on its batch.
    layer_outputs = [list(hidden)] if output_hidden_states else None
    static = config.schedule is not None  # the same counts for every image: one dense batch, no host read
    if static:
        check_schedule(config.schedule, tower, feature_idx, target_num)
    policy = StaticPolicy(config.schedule, tower.has_cls) if static else FlowCutPolicy(target_num, tower.has_cls)
    last, keep_indices, tokens = run_pruned(
        tower, hidden, policy, feature_idx, backend, layer_outputs, per_image=not static, **kwargs
    )
    if static:
        tokens = [tokens] * len(hidden)
    features = last[:, 1:] if tower.has_cls else last
    projected = self.multi_modal_projector(features)
    states = None
    if output_hidden_states:  # per image: its embeddings and each run layer's output, (1, S, C) each
        states = tuple(tuple(layer[b][None] for layer in layer_outputs) for b in range(len(hidden)))
    out = FlowCutImageFeatures(
        last_hidden_state=last,
        pooler_output=list(projected),
        hidden_states=states,
        keep_indices=keep_indices,
        tokens_per_layer=tokens,
    )
    return returned(self, out, return_dict)


def check_processor(processor, core: nn.Module) -> None:
    """``processor`` must be a ``LlavaProcessor`` with the model's image token, not patched for another model."""
    from transformers import LlavaProcessor

    check_processor_class(processor, core, LlavaProcessor)
    model_token = core.config.image_token_id
    require(
        processor.image_token_id == model_token,
        f"processor does not match the model: its image token {processor.image_token!r} has id "
        f"{processor.image_token_id}, but the model's config.image_token_id is {model_token}; pass the processor "
        f"of the model's checkpoint",
    )


def _check_llava(
    model: nn.Module, target_num: int, feature_layer, backend: str, processor, llm_stage: bool
) -> tuple[int, int]:
    """Validate a LLaVA patch before anything changes; returns (target_num, feature_layer) resolved."""
    core = llava_core(model)
    tower = llava_tower(core)
    configured = check_feature_layer(core, tower, feature_layer, "LLaVA")
    target_num = check_target(target_num, tower.num_patches)
    check_rest(core, tower, target_num, backend, llm_stage, processor, check_processor,
               keeps="each image's tower stage", off="leave llm_stage unset")
    return target_num, configured


def patch_llava(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the LLaVA ``model`` (and ``processor``); see the module docstring."""
    require(llm_stage in (None, False, True), f"llm_stage must be True, False or None, got {llm_stage!r}")
    target_num, feature_layer = _check_llava(model, target_num, feature_layer, backend, processor, bool(llm_stage))
    config = FlowCutConfig(target_num, feature_layer, backend, bool(llm_stage), schedule)
    tower = llava_tower(llava_core(model))
    check_schedule(schedule, tower, len(tower.layers) + feature_layer, config.tower_target)
    install(model, llava_core(model), config, processor, seams.llava_count, unpatch_llava, _pruned_image_features,
            expand_by_prompt("pixel_values"))


def unpatch_llava(model: nn.Module) -> None:
    """Undo :func:`patch_llava`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, llava_core(model))


FAMILY = Family(
    "llava",
    classes,
    patch_llava,
    unpatch_llava,
    label="LlavaForConditionalGeneration, LlavaModel (with a CLIP or SigLIP vision tower)",
)

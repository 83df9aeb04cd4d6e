"""FlowCut for HF LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``, SigLIP tower,
anyres) and its ``LlavaOnevisionProcessor``; images only.

An image alone in its prompt is, as in LLaVA-NeXT, a base crop (the whole image) and the gh × gw grid of crops of its
best ``image_grid_pinpoints`` resolution; an image of a prompt with several images is its base crop alone (the stock
model's ``batch_num_images`` rule). Each crop is a SigLIP pass of N₀ = side² patches. The recipe (docs/semantics.md),
with K = ``target_num``, the mean-query variant (relay = each crop's mean query; no CLS row):

1. **Tower stage.** Every crop of an anyres image keeps k = ⌊K/2⌋ patches, the single crop of a multi-image prompt's
   image keeps K (2K with the language-model stage); the crops of one image share one schedule (the batch rule over
   its crops), images are independent. The crops with one count run in one padded pass (:func:`.encoder.run_pruned`;
   two passes where a batch has both kinds); layers after the feature layer are not run.
2. **Layout** (LLaVA-NeXT's, :func:`.anyres.arrange`): the base crop's kept patches first, then the grid crops'
   in raster order of the stitched (gh·side) × (gw·side) grid; without the language-model stage the K with the best
   S_cum stay, with it every unpadded one; patches in the margin stock ``unpad_image`` cuts only to make up K. No
   newline tokens (the stock ``image_newline`` after each row, or after a single-crop image, is not emitted) and no
   ``anyres_max`` down-sampling (the kept patches are sparse). A single-crop image gives its kept patches in patch
   order.
3. **Language-model stage** (``llm_stage=True``, the default, as for LLaVA-NeXT): decoder layer 1 keeps K of each
   image's W ≥ K tokens (:mod:`.lm_stage`).

The patch replaces, on the one ``LlavaOnevisionModel`` instance, ``get_image_features`` (steps 1–2, then the model's
own projector), ``get_placeholder_mask`` (a count mismatch names the fix), ``get_video_features`` (videos are
refused) and, with the stage, ``forward`` (a prefill with images encodes them, then runs :func:`.vlm.staged_forward`;
other calls are stock). The processor, when given, writes K placeholders per image, in single- and multi-image
prompts.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, require
from . import seams
from .encoder import PACKED_OPS, run_pruned
from .instance import restore_patch, returned, set_attrs
from .anyres import (CropImageFeatures, CropPolicy, arrange, check_crop_processor, check_fewest_crops, crop_inputs,
                     stage_on)
from .registry import Family, FlowCutConfig
from .vlm import check_feature_layer, check_rest, expand_by_prompt, install, llava_tower, staged_forward


@dataclass
class FlowCutOnevisionImageFeatures(CropImageFeatures):
    r"""What a patched LLaVA-OneVision's ``get_image_features`` returns (G images, K = target_num); keep_indices and
    tokens_per_layer as :class:`.anyres.CropImageFeatures` says.

    pooler_output: list of G tensors (W_g, C_text): each image's projected features in the language model's order;
        W_g = K, or W_g ≥ K with the language-model stage (which keeps K).
    """


def classes() -> tuple[type, type]:
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

    return LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel


def onevision_core(model: nn.Module) -> nn.Module:
    """The ``LlavaOnevisionModel`` of a ``LlavaOnevisionForConditionalGeneration`` (or the model itself)."""
    return model.model if isinstance(model, classes()[0]) else model


def crop_counts(core: nn.Module, image_sizes, batch_num_images) -> list[int]:
    """The crops of each image: anyres (base + grid) for an image alone in its prompt, 1 in a multi-image prompt."""
    if batch_num_images is None:
        alone = [True] * len(image_sizes)
    else:
        alone = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        require(len(alone) == len(image_sizes), f"batch_num_images={[int(n) for n in batch_num_images]} counts "
                                                f"{len(alone)} images, image_sizes {len(image_sizes)}: pass the "
                                                f"processor's outputs together")
    crop_count = seams.anyres()[1]
    side = core.config.vision_config.image_size
    return [crop_count(size, core.config.image_grid_pinpoints, side) if one else 1
            for size, one in zip(image_sizes, alone)]


def _pruned_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    image_sizes: Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    vision_aspect_ratio: str | None = None,
    batch_num_images: Tensor | None = None,
    **kwargs,
):
    """Patched ``LlavaOnevisionModel.get_image_features``: pixels (G, P_max, 3, S, S) padded, or (ΣP_g, 3, S, S),
    with image_sizes (G, 2) and batch_num_images (images per prompt; None: each image alone) → a
    :class:`FlowCutOnevisionImageFeatures` (a tuple with ``return_dict=False``). ``vision_aspect_ratio`` is taken
    and unused: there is no ``anyres_max`` down-sampling (module docstring)."""
    config = self.flowcut_config
    tower = llava_tower(self)
    crops, pixel_values, feature_layer, return_dict = crop_inputs(
        self, tower, pixel_values, image_sizes, lambda sizes: crop_counts(self, sizes, batch_num_images),
        vision_feature_layer, vision_feature_select_strategy, kwargs, "LLaVA-OneVision",
    )
    target = config.target_num
    backend = ops.resolve_backend(config.backend, tower.device, tower.dtype, PACKED_OPS)
    hidden = tower.embed(pixel_values)
    side = self.config.vision_config.image_size
    per_side = side // self.config.vision_config.patch_size
    grid_shape = seams.anyres()[0]
    first = torch.tensor([0, *crops]).cumsum(0).tolist()
    per_crop = [target // 2 if n > 1 else config.tower_target for n in crops]
    features, where, tokens = [None] * len(crops), [None] * len(crops), [None] * len(crops)
    for count in sorted(set(per_crop)):  # one pass per crop count: anyres crops keep K // 2, single crops K (2K)
        images = [g for g, c in enumerate(per_crop) if c == count]
        rows = torch.cat([torch.arange(first[g], first[g + 1]) for g in images]).to(hidden.device)
        sizes = [crops[g] for g in images]
        policy = CropPolicy(count, sizes, has_cls=False)
        last, keep, run_tokens = run_pruned(
            tower, hidden[rows], policy, len(tower.layers) + feature_layer, backend, per_image=True, **kwargs
        )
        projected = self.multi_modal_projector(last).split(sizes)
        cums = policy.kept_cum.view(-1, count).split(sizes)
        offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
        for i, g in enumerate(images):
            image_keep = keep.split(sizes)[i]
            if crops[g] > 1:
                order = arrange(image_keep, cums[i], grid_shape(image_sizes[g], self.config.image_grid_pinpoints, side),
                                image_sizes[g], per_side, target, exact=not config.llm_stage)
            else:
                order = torch.arange(count, device=keep.device)
            features[g] = projected[i].flatten(0, 1)[order]
            crop = torch.arange(crops[g], device=keep.device).repeat_interleave(count)
            where[g] = torch.stack([crop[order], image_keep.flatten()[order]], 1)
            tokens[g] = run_tokens[offsets[i]]
    out = FlowCutOnevisionImageFeatures(pooler_output=features, keep_indices=where, tokens_per_layer=tokens)
    return returned(self, out, return_dict)


def _staged_forward(
    self: nn.Module,
    input_ids=None,
    pixel_values=None,
    image_sizes=None,
    pixel_values_videos=None,
    image_sizes_videos=None,
    vision_feature_layer=None,
    vision_feature_select_strategy=None,
    vision_aspect_ratio=None,
    batch_num_images=None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """The patched forward with the language-model stage: the images are encoded here (their crops follow
    ``batch_num_images``), then :func:`.vlm.staged_forward` prefills on their tower-stage features."""
    if pixel_values_videos is not None or (mm_encoder_outputs or {}).get("video") is not None:
        _refused_video_features(self)
    if pixel_values is not None:
        require(mm_encoder_outputs is None, "pass pixel_values or mm_encoder_outputs, not both")
        mm_encoder_outputs = {"image": self.get_image_features(
            pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, batch_num_images=batch_num_images,
            return_dict=True,
        )}
    return staged_forward(self, input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, **kwargs)


def _refused_video_features(self: nn.Module, *args, **kwargs):
    """Patched ``LlavaOnevisionModel.get_video_features``: videos are refused."""
    raise FlowCutInputError(
        "FlowCut's LLaVA-OneVision patch prunes images only: videos are not supported; pass images, or call "
        "flowcut_kernels.remove_flowcut(model) to process videos"
    )


def check_processor(processor, core: nn.Module) -> None:
    """``processor`` must be a ``LlavaOnevisionProcessor`` for this model (image token, crop size, grid resolutions),
    not patched for another model."""
    from transformers import LlavaOnevisionProcessor

    check_crop_processor(processor, core, LlavaOnevisionProcessor, getattr(processor, "image_processor", None)
                         and getattr(processor.image_processor, "size", None))


def _check_onevision(model: nn.Module, target_num, feature_layer, backend: str, processor, llm_stage) -> int:
    """Validate a LLaVA-OneVision patch before anything changes; returns the feature layer (negative)."""
    core = onevision_core(model)
    tower = llava_tower(core)
    require(not tower.has_cls, f"LLaVA-OneVision is supported with its SigLIP vision tower; this model's is a "
                               f"{type(core.vision_tower).__name__}")
    configured = check_feature_layer(core, tower, feature_layer, "LLaVA-OneVision")
    require(
        isinstance(target_num, int) and not isinstance(target_num, bool) and 2 <= target_num < tower.num_patches,
        f"target_num={target_num!r} is out of range for LLaVA-OneVision: each anyres crop keeps target_num // 2 "
        f"patches, a multi-image prompt's image target_num of its {tower.num_patches}; use target_num in "
        f"[2, {tower.num_patches - 1}]",
    )
    check_fewest_crops(core, target_num)
    check_rest(core, tower, target_num, backend, llm_stage, processor, check_processor,
               keeps="the single crop of a multi-image prompt's image", off="llm_stage=False")
    return configured


def patch_llava_onevision(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the LLaVA-OneVision ``model`` (and ``processor``); see the module
    docstring. ``llm_stage=None`` is the recipe's default for LLaVA-OneVision, as for LLaVA-NeXT: on."""
    llm_stage = stage_on(llm_stage, schedule, "LLaVA-OneVision")
    feature_layer = _check_onevision(model, target_num, feature_layer, backend, processor, llm_stage)
    config = FlowCutConfig(target_num, feature_layer, backend, llm_stage)
    core = onevision_core(model)
    install(model, core, config, processor, seams.onevision_count, unpatch_llava_onevision, _pruned_image_features,
            expand_by_prompt("pixel_values", "image_sizes"))
    set_attrs(core, get_video_features=types.MethodType(_refused_video_features, core))
    if llm_stage:
        set_attrs(core, forward=types.MethodType(_staged_forward, core))


def unpatch_llava_onevision(model: nn.Module) -> None:
    """Undo :func:`patch_llava_onevision`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, onevision_core(model))


FAMILY = Family(
    "llava_onevision",
    classes,
    patch_llava_onevision,
    unpatch_llava_onevision,
    label="LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel (with its SigLIP vision tower; images only)",
)

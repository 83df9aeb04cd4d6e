"""FlowCut for HF LLaVA-NeXT (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``, CLIP towers, anyres) and its
``LlavaNextProcessor``.

An image of size (H, W) is a base crop (the whole image) and a gh × gw grid of crops (its best ``image_grid_pinpoints``
resolution), each a CLIP pass of N₀ = side² patches. The recipe (docs/semantics.md), with K = ``target_num``:

1. **Tower stage.** Every crop keeps k = ⌊K/2⌋ patches (plus its CLS row, dropped from the features); the crops of
   one image share one schedule (the batch rule over its crops), images are independent. All crops of the batch run
   in one padded pass (:func:`.encoder.run_pruned`); layers after the feature layer are not run.
2. **Layout.** The base crop's kept patches come first, then the grid crops' kept patches in raster order of the
   stitched (gh·side) × (gw·side) grid; those in the margin that stock ``unpad_image`` cuts are dropped. No newline
   tokens. Should fewer than K survive, margin patches are taken back, best S_cum first (S_cum of the crop's last
   prune), so that at least K remain.
3. **Language-model stage** (``llm_stage=True``, the default): decoder layer 1 keeps K of each image's W ≥ K tokens
   (:mod:`.lm_stage`). Without it: the K survivors with the best S_cum (margin patches only to make up K), in the
   layout's order.

The patch replaces, on the one ``LlavaNextModel`` instance, ``get_image_features`` (steps 1–2, or 1–3 without the
stage), ``get_placeholder_mask`` (a count mismatch names the fix) and, with the stage, ``forward`` (a prefill with
images runs :func:`.lm_stage.prefill`; other calls are stock). The processor emits K placeholders per image, whatever
its size: its ``_get_number_of_features`` gives K (+ 1 for the "default" strategy's CLS drop) on this instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import require
from . import seams
from .encoder import PACKED_OPS, run_pruned
from .instance import restore_patch, returned
from .anyres import (CropImageFeatures, CropPolicy, arrange, check_crop_processor, check_fewest_crops, crop_inputs,
                     stage_on)
from .vlm import check_feature_layer, check_rest, expand_by_prompt, install, llava_tower
from .registry import Family, FlowCutConfig


@dataclass
class FlowCutNextImageFeatures(CropImageFeatures):
    r"""What a patched LLaVA-NeXT's ``get_image_features`` returns (G images, P_g crops each, k = ⌊target_num/2⌋);
    keep_indices and tokens_per_layer as :class:`.anyres.CropImageFeatures` says.

    last_hidden_state: (ΣP_g, 1 + k, C_vision) the feature layer's output on each crop's kept tokens (CLS row first),
        crops image by image, each image's base crop first.
    pooler_output: list of G tensors (W_g, C_text): each image's projected features in the language model's order
        (module docstring); W_g ≥ target_num with ``llm_stage`` (the stage keeps target_num), W_g = target_num without.
    """


def classes() -> tuple[type, type]:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

    return LlavaNextForConditionalGeneration, LlavaNextModel


def next_core(model: nn.Module) -> nn.Module:
    """The ``LlavaNextModel`` of a ``LlavaNextForConditionalGeneration`` (or the ``LlavaNextModel`` itself)."""
    return model.model if isinstance(model, classes()[0]) else model


def _pruned_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    image_sizes: Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs,
):
    """Patched ``LlavaNextModel.get_image_features``: pixels (G, P_max, 3, S, S) padded, or (ΣP_g, 3, S, S), with
    image_sizes (G, 2) → a :class:`FlowCutNextImageFeatures` (a tuple with ``return_dict=False``), like the stock
    one."""
    config = self.flowcut_config
    tower = llava_tower(self)
    side = tower.core.embeddings.image_size
    pinpoints = self.config.image_grid_pinpoints
    grid_shape, crop_count, _ = seams.anyres()
    crops, pixel_values, feature_layer, return_dict = crop_inputs(
        self, tower, pixel_values, image_sizes, lambda sizes: [crop_count(size, pinpoints, side) for size in sizes],
        vision_feature_layer, vision_feature_select_strategy, kwargs, "LLaVA-NeXT",
    )

    hidden = tower.embed(pixel_values)
    per_crop = config.target_num // 2
    backend = ops.resolve_backend(config.backend, tower.device, tower.dtype, PACKED_OPS)
    policy = CropPolicy(per_crop, crops)
    last, keep, tokens = run_pruned(
        tower, hidden, policy, len(tower.layers) + feature_layer, backend, per_image=True, **kwargs
    )
    projected = self.multi_modal_projector(last[:, 1:]).split(crops)
    features, where = [], []
    patches_per_side = side // tower.core.embeddings.patch_size
    cums = policy.kept_cum.view(-1, per_crop).split(crops)
    for g, (image_keep, image_cum) in enumerate(zip(keep.split(crops), cums)):
        grid = grid_shape(image_sizes[g], pinpoints, side)
        order = arrange(image_keep, image_cum, grid, image_sizes[g], patches_per_side, config.target_num,
                        exact=not config.llm_stage)
        features.append(projected[g].flatten(0, 1)[order])
        crop = torch.arange(len(image_keep), device=keep.device).repeat_interleave(per_crop)
        where.append(torch.stack([crop[order], image_keep.flatten()[order]], 1))
    first_crops = torch.tensor([0, *crops[:-1]]).cumsum(0).tolist()
    out = FlowCutNextImageFeatures(
        last_hidden_state=last,
        pooler_output=features,
        keep_indices=where,
        tokens_per_layer=[tokens[c] for c in first_crops],
    )
    return returned(self, out, return_dict)


def check_processor(processor, core: nn.Module) -> None:
    """``processor`` must be a ``LlavaNextProcessor`` for this model (image token, crop size, grid resolutions), not
    patched for another model."""
    from transformers import LlavaNextProcessor

    check_crop_processor(processor, core, LlavaNextProcessor, getattr(processor, "image_processor", None)
                         and getattr(processor.image_processor, "crop_size", None))


def _check_next(model: nn.Module, target_num: int, feature_layer, backend: str, processor, llm_stage: bool) -> int:
    """Validate a LLaVA-NeXT patch before anything changes; returns the feature layer (negative)."""
    core = next_core(model)
    tower = llava_tower(core)
    require(tower.has_cls, f"LLaVA-NeXT is supported with a CLIP vision tower; this model's is a "
                           f"{type(core.vision_tower).__name__}")
    configured = check_feature_layer(core, tower, feature_layer, "LLaVA-NeXT")
    require(
        isinstance(target_num, int) and not isinstance(target_num, bool) and 2 <= target_num < 2 * tower.num_patches,
        f"target_num={target_num!r} is out of range for LLaVA-NeXT: each crop keeps target_num // 2 patches, at least "
        f"1 and fewer than its {tower.num_patches}; use target_num in [2, {2 * tower.num_patches - 1}]",
    )
    check_fewest_crops(core, target_num)
    check_rest(core, tower, target_num, backend, llm_stage, processor, check_processor)
    return configured


def patch_llava_next(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the LLaVA-NeXT ``model`` (and ``processor``); see the module docstring.
    ``llm_stage=None`` is the recipe's default for LLaVA-NeXT: on."""
    llm_stage = stage_on(llm_stage, schedule, "LLaVA-NeXT")
    feature_layer = _check_next(model, target_num, feature_layer, backend, processor, llm_stage)
    config = FlowCutConfig(target_num, feature_layer, backend, llm_stage)
    install(model, next_core(model), config, processor, seams.next_count, unpatch_llava_next, _pruned_image_features,
            expand_by_prompt("pixel_values", "image_sizes"))


def unpatch_llava_next(model: nn.Module) -> None:
    """Undo :func:`patch_llava_next`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, next_core(model))


FAMILY = Family(
    "llava_next",
    classes,
    patch_llava_next,
    unpatch_llava_next,
    label="LlavaNextForConditionalGeneration, LlavaNextModel (with a CLIP vision tower)",
)

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
from . import lm_stage, seams
from .encoder import PACKED_OPS, check_pixels, run_pruned
from .instance import restore_patch, set_attrs
from .vlm import (
    check_feature_layer,
    check_processor_owner,
    check_strategy,
    expand_by_prompt,
    feature_layer_of,
    install,
    llava_tower,
)
from .policy import FlowCutPolicy, LayerView
from .schedule import refuse_schedule
from .registry import Family, FlowCutConfig


@dataclass
class FlowCutNextImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched LLaVA-NeXT's ``get_image_features`` returns (G images, P_g crops each, k = ⌊target_num/2⌋).

    last_hidden_state: (ΣP_g, 1 + k, C_vision) the feature layer's output on each crop's kept tokens (CLS row first),
        crops image by image, each image's base crop first.
    pooler_output: list of G tensors (W_g, C_text): each image's projected features in the language model's order
        (module docstring); W_g ≥ target_num with ``llm_stage`` (the stage keeps target_num), W_g = target_num without.
    keep_indices: list of G int64 tensors (W_g, 2): the (crop, patch) each row of pooler_output came from — crop 0 is
        the base image, crops 1 … gh·gw the grid in raster order; patch in the crop's raster numbering 0 … N₀ − 1.
    tokens_per_layer: one list per image: the tokens each of its crops processed in each run layer 0 … F.
    """

    keep_indices: list[Tensor] | None = None
    tokens_per_layer: list[list[int]] | None = None


def classes() -> tuple[type, type]:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

    return LlavaNextForConditionalGeneration, LlavaNextModel


def next_core(model: nn.Module) -> nn.Module:
    """The ``LlavaNextModel`` of a ``LlavaNextForConditionalGeneration`` (or the ``LlavaNextModel`` itself)."""
    return model.model if isinstance(model, classes()[0]) else model


class CropPolicy(FlowCutPolicy):
    """FlowCut on crops: the loop's rows are crops, image by image; the crops of an image share one schedule (each
    prune keeps the fewest rows any of them would: the batch rule over its crops). Records ``kept_cum``: each kept
    patch's S_cum at its crop's last prune, (ΣP_g · k,) packed crop by crop in ascending patch order. CLIP crops
    (``has_cls``: the CLS variant, LLaVA-NeXT) or SigLIP crops (the mean-query variant, LLaVA-OneVision)."""

    def __init__(self, per_crop: int, crops: list[int], has_cls: bool = True):
        super().__init__(per_crop, has_cls=has_cls)
        self.crops = crops
        self.kept_cum = None

    def step(self, layer: LayerView) -> tuple[Tensor, list[int] | None]:
        cum, keep = super().step(layer)
        if keep is None:
            return cum, None
        keep = [int(group.min()) for group in torch.tensor(keep).split(self.crops) for _ in group]
        # The rows the loop keeps (the same rule as select_gather: best S_cum, ties to the lower index).
        relay = int(layer.has_cls)
        candidates = layer.cu_seqlens - relay * torch.arange(len(keep) + 1, device=cum.device,
                                                             dtype=layer.cu_seqlens.dtype)
        kept = ops.topk_select(cum, [k - relay for k in keep], cu_seqlens=candidates, backend=layer.backend).kept
        self.kept_cum = cum[kept]
        return cum, keep


def arrange(keep: Tensor, cum: Tensor, grid: tuple[int, int], image_size, side: int, count: int, exact: bool) -> Tensor:
    """One image's kept tower patches in the language model's order (module docstring, step 2).

    keep, cum: (P, k) each crop's kept patch numbers (ascending) and their S_cum; crop 0 is the base image, crops
        1 … gh·gw the grid (gh, gw) in raster order. image_size: the image's (H, W); side: patches per crop side.
    count: K. exact: keep exactly K, the best S_cum first among the unpadded patches; otherwise every unpadded patch,
        or K if fewer survive.
    Returns (W,) indices into keep.flatten(): the base crop's first, then the grid's in stitched raster order.
    """
    crops, k = keep.shape
    rows, cols = grid[0] * side, grid[1] * side
    crop = torch.arange(crops, device=keep.device).repeat_interleave(k)
    patch, cum = keep.flatten(), cum.flatten()
    tile = (crop - 1).clamp(min=0)
    at = (tile // grid[1] * side + patch // side) * cols + tile % grid[1] * side + patch % side  # stitched raster
    inside = torch.zeros(rows * cols, dtype=torch.bool, device=keep.device)
    unpad_image = seams.anyres()[2]
    inside[unpad_image(torch.arange(rows * cols, device=keep.device).view(1, rows, cols), image_size).flatten()] = True
    base = crop == 0
    order_key = torch.where(base, patch, side * side + at)  # the base crop first
    margin = ~base & ~inside[at]
    order = order_key.argsort()
    order = order[cum[order].argsort(descending=True, stable=True)]  # ties: the earlier token
    order = order[margin[order].int().argsort(stable=True)]  # unpadded patches before margin ones
    chosen = order[: count if exact else max(count, int((~margin).sum()))]
    return chosen[order_key[chosen].argsort()]


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
    if vision_feature_layer is None:
        vision_feature_layer = self.config.vision_feature_layer
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = self.config.vision_feature_select_strategy
    feature_layer = feature_layer_of(vision_feature_layer, len(tower.layers))
    check_strategy(vision_feature_select_strategy, tower)
    return_dict = kwargs.pop("return_dict", None)
    for option in ("output_attentions", "output_hidden_states"):
        require(not kwargs.pop(option, None), f"{option}=True is unavailable on a FlowCut-patched LLaVA-NeXT vision "
                                               f"tower; call flowcut_kernels.remove_flowcut(model) first")
    require(pixel_values is not None and image_sizes is not None,
            "pixel_values and image_sizes are required: pass the LlavaNextProcessor's outputs")
    side = tower.core.embeddings.image_size
    pinpoints = self.config.image_grid_pinpoints
    grid_shape, crop_count, _ = seams.anyres()
    crops = [crop_count(size, pinpoints, side) for size in image_sizes]
    if isinstance(pixel_values, Tensor):  # as the stock tower's forward would, under a device map
        pixel_values = pixel_values.to(tower.device)
        if pixel_values.dim() == 5:  # (G, P_max, 3, S, S) padded with empty crops
            pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)])
    check_pixels(pixel_values, tower)
    require(len(pixel_values) == sum(crops), f"pixel_values holds {len(pixel_values)} crops, but image_sizes "
                                             f"gives {sum(crops)}: pass the processor's pixel_values and image_sizes "
                                             f"together")

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
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def check_processor(processor, core: nn.Module) -> None:
    """``processor`` must be a ``LlavaNextProcessor`` for this model (image token, crop size, grid resolutions), not
    patched for another model."""
    from transformers import LlavaNextProcessor

    require(
        isinstance(processor, LlavaNextProcessor),
        f"processor is a {type(processor).__name__}; pass the model's LlavaNextProcessor (e.g. "
        f"AutoProcessor.from_pretrained of the same checkpoint), whose image-token count FlowCut adjusts",
    )
    image_processor = processor.image_processor
    crop = getattr(image_processor, "crop_size", None) or {}
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop.height, crop.width)
    side = core.config.vision_config.image_size
    mismatches = [
        f"{name} {theirs!r} (the model's {ours!r})"
        for name, theirs, ours in (
            ("image token id", processor.image_token_id, core.config.image_token_id),
            ("image_grid_pinpoints", [list(p) for p in image_processor.image_grid_pinpoints],
             [list(p) for p in core.config.image_grid_pinpoints]),
            ("crop size", crop, (side, side)),
        )
        if theirs != ours
    ]
    require(not mismatches, f"processor does not match the model: its {', '.join(mismatches)}; pass the processor "
                            f"of the model's checkpoint")
    check_processor_owner(processor, core)


def _check_next(model: nn.Module, target_num: int, feature_layer, backend: str, processor, llm_stage: bool) -> int:
    """Validate a LLaVA-NeXT patch before anything changes; returns the feature layer (negative)."""
    core = next_core(model)
    tower = llava_tower(core)
    require(tower.has_cls, f"LLaVA-NeXT is supported with a CLIP vision tower; this model's is a "
                           f"{type(core.vision_tower).__name__}")
    configured = check_feature_layer(core, tower, feature_layer, "LLaVA-NeXT")
    side = core.config.vision_config.image_size
    fewest = 1 + min((h // side) * (w // side) for h, w in core.config.image_grid_pinpoints)
    require(
        isinstance(target_num, int) and not isinstance(target_num, bool) and 2 <= target_num < 2 * tower.num_patches,
        f"target_num={target_num!r} is out of range for LLaVA-NeXT: each crop keeps target_num // 2 patches, at least "
        f"1 and fewer than its {tower.num_patches}; use target_num in [2, {2 * tower.num_patches - 1}]",
    )
    require(
        fewest * (target_num // 2) >= target_num,
        f"target_num={target_num} is more than the tower stage keeps from an image of {fewest} crops (the fewest the "
        f"model's image_grid_pinpoints give): each crop keeps target_num // 2 = {target_num // 2}, "
        f"{fewest * (target_num // 2)} in all; use an even target_num",
    )
    ops.resolve_backend(backend, tower.device, tower.dtype, PACKED_OPS)
    if llm_stage:
        lm_stage.check_decoder(core.language_model, backend)
    if processor is not None:
        check_processor(processor, core)
    return configured


def patch_llava_next(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the LLaVA-NeXT ``model`` (and ``processor``); see the module docstring.
    ``llm_stage=None`` is the recipe's default for LLaVA-NeXT: on."""
    require(llm_stage in (None, False, True), f"llm_stage must be True, False or None, got {llm_stage!r}")
    refuse_schedule(schedule, "LLaVA-NeXT")
    llm_stage = llm_stage is not False
    feature_layer = _check_next(model, target_num, feature_layer, backend, processor, llm_stage)
    config = FlowCutConfig(target_num, feature_layer, backend, llm_stage)
    core = next_core(model)
    if processor is None:
        processor = vars(core).get("_flowcut_processor")  # a re-apply keeps the model's processor
    counting = seams.next_count(processor, target_num) if processor is not None else {}
    unpatch_llava_next(model)  # a re-apply starts from the stock model (and restores a replaced processor)
    if processor is not None:
        set_attrs(processor, **counting)
    install(model, core, config, processor, _pruned_image_features, expand_by_prompt("pixel_values", "image_sizes"))


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

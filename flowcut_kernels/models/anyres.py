"""The anyres crop pieces LLaVA-NeXT (:mod:`.llava_next`) and LLaVA-OneVision (:mod:`.llava_onevision`) share.

An image of size (H, W) is a base crop (the whole image) and a gh × gw grid of crops (its best
``image_grid_pinpoints`` resolution), each a tower pass of side² patches. Here: the crops' FlowCut policy (one
schedule per image), the layout of an image's kept patches in the language model's order, the inputs the patched
``get_image_features`` checks and its output's own fields, and the ``llm_stage``, processor and ``target_num`` checks
both families make.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import require
from . import seams
from .encoder import check_pixels
from .policy import FlowCutPolicy, LayerView
from .schedule import refuse_schedule
from .tower import Tower
from .vlm import check_processor_class, check_processor_fields, requested_layer


@dataclass
class CropImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched anyres ``get_image_features`` returns (G images), besides the stock fields (each family's
    subclass says what those hold).

    keep_indices: list of G int64 tensors (W_g, 2): the (crop, patch) each row of pooler_output came from — crop 0 is
        the base image, crops 1 … gh·gw the grid in raster order; patch in the crop's raster numbering 0 … N₀ − 1.
    tokens_per_layer: one list per image: the tokens each of its crops processed in each run layer 0 … F.
    """

    keep_indices: list[Tensor] | None = None
    tokens_per_layer: list[list[int]] | None = None


def stage_on(llm_stage, schedule, family: str) -> bool:
    """An anyres family's ``llm_stage`` (True, False, or None: on, their default), with no ``schedule`` given."""
    require(llm_stage in (None, False, True), f"llm_stage must be True, False or None, got {llm_stage!r}")
    refuse_schedule(schedule, family)
    return llm_stage is not False


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
    """One image's kept tower patches in the language model's order (docs/semantics.md, LLaVA-NeXT step 2): the base
    crop's first, then the grid crops' in raster order of the stitched grid; those in the margin stock
    ``unpad_image`` cuts only to make up K.

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


def crop_inputs(self: nn.Module, tower: Tower, pixel_values, image_sizes, crops_of, vision_feature_layer,
                vision_feature_select_strategy, kwargs: dict, family: str):
    """The checked inputs of a patched anyres ``get_image_features`` (``self``: the model's core): the crops of
    each image (``crops_of(image_sizes)``), the pixels (ΣP_g, 3, S, S) on the tower's device (from (G, P_max, 3,
    S, S) padded, or as given), the feature layer (negative) and ``return_dict`` (None: the config's, for
    :func:`.instance.returned`). Pops ``return_dict`` and refuses ``output_attentions`` / ``output_hidden_states`` from
    ``kwargs``."""
    feature_layer = requested_layer(self, tower, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", None)
    for option in ("output_attentions", "output_hidden_states"):
        require(not kwargs.pop(option, None), f"{option}=True is unavailable on a FlowCut-patched {family} vision "
                                               f"tower; call flowcut_kernels.remove_flowcut(model) first")
    require(pixel_values is not None and image_sizes is not None,
            f"pixel_values and image_sizes are required: pass the {family} processor's outputs")
    crops = crops_of(image_sizes)
    if isinstance(pixel_values, Tensor):  # as the stock tower's forward would, under a device map
        pixel_values = pixel_values.to(tower.device)
        if pixel_values.dim() == 5:  # (G, P_max, 3, S, S) padded with empty crops
            pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)])
    check_pixels(pixel_values, tower)
    require(len(pixel_values) == sum(crops), f"pixel_values holds {len(pixel_values)} crops, but image_sizes "
                                             f"gives {sum(crops)}: pass the processor's pixel_values and image_sizes "
                                             f"together")
    return crops, pixel_values, feature_layer, return_dict


def check_crop_processor(processor, core: nn.Module, processor_class: type, crop_size) -> None:
    """``processor`` must be a ``processor_class`` for this model (image token, grid resolutions, and
    ``crop_size``, its image processor's crop (a dict or an object with height and width), the tower's image size),
    not patched for another model."""
    check_processor_class(processor, core, processor_class)
    crop = crop_size or {}
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop.height, crop.width)
    side = core.config.vision_config.image_size
    check_processor_fields([
        ("image token id", processor.image_token_id, core.config.image_token_id),
        ("image_grid_pinpoints", [list(p) for p in processor.image_processor.image_grid_pinpoints],
         [list(p) for p in core.config.image_grid_pinpoints]),
        ("crop size", crop, (side, side)),
    ])


def check_fewest_crops(core: nn.Module, target_num: int) -> None:
    """The tower stage must keep at least ``target_num`` patches of an image of the fewest crops the model's
    ``image_grid_pinpoints`` give (each crop keeps ``target_num // 2``)."""
    side = core.config.vision_config.image_size
    fewest = 1 + min((h // side) * (w // side) for h, w in core.config.image_grid_pinpoints)
    require(
        fewest * (target_num // 2) >= target_num,
        f"target_num={target_num} is more than the tower stage keeps from an image of {fewest} crops (the fewest the "
        f"model's image_grid_pinpoints give): each crop keeps target_num // 2 = {target_num // 2}, "
        f"{fewest * (target_num // 2)} in all; use an even target_num",
    )

"""FlowCut for HF LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``, SigLIP tower,
anyres) and its ``LlavaOnevisionProcessor``: images and videos.

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

**Videos** (``pixel_values_videos`` (V, F, 3, S, S): F frames per video) keep K tokens per video, tower stage only
(with or without ``llm_stage``, whose decoder prune sees images only): every frame keeps k = ⌈K/F⌉ patches, the F
frames of a video sharing one schedule (the batch rule over its frames, as an image's crops), videos independent, all
in one padded pass; then the K with the best S_cum (S_cum of the frame's last prune; ties: the earlier frame, then the
lower patch) stay, frame by frame in patch order. There is no 2 × 2 bilinear pooling of the frames (it would average
kept with dropped patches) and no newline token after the video: exactly K tokens per video, a count the processor
writes before the tower runs. Every K the patch admits (K < N₀) is met by a video of at least one frame.

The patch replaces, on the one ``LlavaOnevisionModel`` instance, ``get_image_features`` (steps 1–2, then the model's
own projector), ``get_video_features`` (the video recipe, then the projector), ``get_placeholder_mask`` (a count
mismatch names the fix) and ``forward``: videos (pixels, or pre-encoded in ``mm_encoder_outputs``) go into the
embeddings at their placeholders, then, with the stage, a prefill with images encodes them and runs
:func:`.vlm.staged_forward`; other calls are stock. The processor, when given, writes K placeholders per image, in
single- and multi-image prompts, and K per video (5.1+; 5.0's processor counts videos inside ``__call__``, a count
the patched model refuses: write K ``<video>`` tokens per video there).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import require
from . import seams
from .encoder import PACKED_OPS, check_pixels, run_pruned
from .instance import prior_attr, restore_patch, returned, set_attrs
from .anyres import (CropImageFeatures, CropPolicy, arrange, check_crop_processor, check_fewest_crops, crop_inputs,
                     stage_on)
from .registry import Family, FlowCutConfig
from .vlm import (check_feature_layer, check_rest, expand_by_prompt, install, llava_tower, requested_layer,
                  staged_forward)


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


@dataclass
class FlowCutOnevisionVideoFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched LLaVA-OneVision's ``get_video_features`` returns (V videos of F frames, K = target_num).

    pooler_output: (V, K, C_text) each video's projected features, frame by frame in patch order.
    keep_indices: (V, K, 2) int64 the (frame, patch) each row came from; patch in the frame's raster numbering.
    tokens_per_layer: one list per video: the tokens each of its frames processed in each run layer 0 … F.
    """

    keep_indices: Tensor | None = None
    tokens_per_layer: list[list[int]] | None = None


def _pruned_video_features(
    self: nn.Module,
    pixel_values_videos: Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    **kwargs,
):
    """Patched ``LlavaOnevisionModel.get_video_features``: pixels (V, F, 3, S, S) → a
    :class:`FlowCutOnevisionVideoFeatures` (a tuple with ``return_dict=False``), the video recipe of the module
    docstring."""
    tower = llava_tower(self)
    feature_layer = requested_layer(self, tower, vision_feature_layer, vision_feature_select_strategy)
    return_dict = kwargs.pop("return_dict", None)
    for option in ("output_attentions", "output_hidden_states"):
        require(not kwargs.pop(option, None), f"{option}=True is unavailable on a FlowCut-patched LLaVA-OneVision "
                                               f"vision tower; call flowcut_kernels.remove_flowcut(model) first")
    require(isinstance(pixel_values_videos, Tensor) and pixel_values_videos.dim() == 5
            and pixel_values_videos.shape[1] >= 1,
            f"pixel_values_videos must be a (videos, frames, 3, height, width) tensor with at least one frame, got "
            f"{tuple(getattr(pixel_values_videos, 'shape', ()))}: pass the processor's pixel_values_videos")
    videos, frames = pixel_values_videos.shape[:2]
    pixels = pixel_values_videos.to(tower.device).flatten(0, 1)
    check_pixels(pixels, tower)
    target = self.flowcut_config.target_num
    per_frame = -(-target // frames)
    backend = ops.resolve_backend(self.flowcut_config.backend, tower.device, tower.dtype, PACKED_OPS)
    policy = CropPolicy(per_frame, [frames] * videos, has_cls=False)
    last, keep, tokens = run_pruned(tower, tower.embed(pixels), policy, len(tower.layers) + feature_layer, backend,
                                    per_image=True, **kwargs)
    cum = policy.kept_cum.view(videos, frames * per_frame)
    order = cum.argsort(dim=1, descending=True, stable=True)[:, :target].sort(1).values  # (V, K): ties the earlier
    projected = self.multi_modal_projector(last).reshape(videos, frames * per_frame, -1)
    features = projected.gather(1, order[..., None].expand(-1, -1, projected.shape[-1]))
    where = torch.stack([order // per_frame, keep.reshape(videos, -1).gather(1, order)], -1)
    out = FlowCutOnevisionVideoFeatures(pooler_output=features, keep_indices=where,
                                        tokens_per_layer=tokens[::frames])
    return returned(self, out, return_dict)


def _with_videos(self: nn.Module, input_ids, inputs_embeds, videos) -> Tensor:
    """The prompts' embeddings (B, L, C) with each video's K features (``videos.pooler_output`` (V, K, C)) at its
    K placeholders; their count must be K per video."""
    require((input_ids is None) != (inputs_embeds is None), "pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    token = self.config.video_token_id
    if input_ids is not None:
        marks = input_ids == token
    else:
        marks = (inputs_embeds == self.get_input_embeddings()(torch.tensor(token, device=inputs_embeds.device))).all(-1)
    features = videos.pooler_output
    target = self.flowcut_config.target_num
    require(
        int(marks.sum()) == features.shape[0] * features.shape[1],
        f"the prompts hold {int(marks.sum())} video placeholder tokens, but FlowCut gives the language model "
        f"{features.shape[0] * features.shape[1]} for {features.shape[0]} video(s) ({target} per video): pass the "
        f"processor when patching, flowcut(model, {target}, processor=processor), and process the prompts again "
        f"(transformers 5.0's processor cannot: write {target} video tokens per video)",
    )
    features = features.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
    return inputs_embeds.masked_scatter(marks[..., None].to(inputs_embeds.device), features)


def _patched_forward(
    self: nn.Module,
    input_ids=None,
    pixel_values=None,
    image_sizes=None,
    pixel_values_videos=None,
    image_sizes_videos=None,
    inputs_embeds=None,
    vision_feature_layer=None,
    vision_feature_select_strategy=None,
    batch_num_images=None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """The patched forward: the videos (pixels, encoded here, or ``mm_encoder_outputs["video"]``) go into the
    embeddings at their placeholders; then, with the language-model stage, a prefill with images encodes them (their
    crops follow ``batch_num_images``) and runs :func:`.vlm.staged_forward` on their tower-stage features; otherwise
    the stock forward runs on the embeddings."""
    encoded = dict(mm_encoder_outputs or {})
    videos = encoded.pop("video", None)
    if pixel_values_videos is not None:
        require(videos is None, "pass pixel_values_videos or mm_encoder_outputs['video'], not both")
        videos = self.get_video_features(pixel_values_videos, vision_feature_layer=vision_feature_layer,
                                         vision_feature_select_strategy=vision_feature_select_strategy,
                                         return_dict=True)
    if videos is not None:
        inputs_embeds, input_ids = _with_videos(self, input_ids, inputs_embeds, videos), None
    if mm_encoder_outputs is not None:  # transformers > 5.0 only
        kwargs["mm_encoder_outputs"] = encoded or None
    if self.flowcut_config.llm_stage and pixel_values is not None:
        require(not encoded.get("image"), "pass pixel_values or mm_encoder_outputs, not both")
        kwargs["mm_encoder_outputs"] = {"image": self.get_image_features(
            pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, batch_num_images=batch_num_images,
            return_dict=True,
        )}
        pixel_values = None
    if self.flowcut_config.llm_stage:
        out = staged_forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    else:
        out = prior_attr(self, "forward")(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            batch_num_images=batch_num_images, **kwargs,
        )
    return out if videos is None else seams.with_video_outputs(out, videos)


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
    set_attrs(core, get_video_features=types.MethodType(_pruned_video_features, core),
              forward=types.MethodType(_patched_forward, core))
    processor = vars(core).get("_flowcut_processor")  # the one given, or a re-apply's kept one
    if processor is not None:
        set_attrs(processor, **seams.onevision_video_count(processor, target_num))


def unpatch_llava_onevision(model: nn.Module) -> None:
    """Undo :func:`patch_llava_onevision`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, onevision_core(model))


FAMILY = Family(
    "llava_onevision",
    classes,
    patch_llava_onevision,
    unpatch_llava_onevision,
    label="LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel (with its SigLIP vision tower; images, videos)",
)

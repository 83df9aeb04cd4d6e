"""FlowCut for HF Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel``,
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``) and their processors.

The vision tower holds the patches of all images packed along one token axis (``cu_seqlens``), each image's in
merge-block order: the merger turns every run of m = spatial_merge_size² consecutive patches (one 2×2 block) into one
language-model token. FlowCut (docs/semantics.md, mean-query variant) runs on it in **merge groups**:

- every tower layer ℓ = 0 … L − 1 runs and is scored from the q/k/v its attention used (after the tower's rotary
  embedding; relay = the mean query of the image), rpl = L − ℓ − 1: the merger is the feature layer (F = L);
- a group's score is the sum of its m members' S_cum; the entropy Hn is the patch-level one;
- a prune step (rpl even) keeps whole groups, per image (per-image schedules): G groups, target T_g,
  prune_g = round_half_to_even((G − T_g)/√rpl · (1 − Hn²)), keep_g = max(G − prune_g, T_g); rpl = 0 keeps T_g.
  Kept groups stay in order, with their members' S_cum, rotary embeddings and the recounted ``cu_seqlens``.
- An image with G₀ ≤ target_num groups is kept whole (T_g = G₀).
- Qwen2.5-VL's tower reorders the groups window by window before its blocks (whole groups, so each stays a run of m
  patches) and undoes it after the merger. Pruned, the kept groups keep their windows and the tower's order; the
  windowed layers attend within each window's kept groups (its length recounted, an emptied window gone), the
  ``fullatt_block_indexes`` layers within the image. Scores are per image in every layer (relay = the image's mean
  query over all its windows). The kept groups go back to their image's order before the merger.

The patch replaces, on the one ``Qwen2VLModel`` (``Qwen2_5_VLModel``) instance:

- ``get_image_features``: the pruned tower and the model's own merger; ``pooler_output`` is one (K_b, C_text) tensor
  per image (K_b = min(target_num, G₀_b)), ``keep_groups`` their merge-group numbers.
- ``forward``: a call with images takes their features, puts them in the placeholders and gives each kept token its
  original M-RoPE (t, h, w) position; text continues from the unpruned sequence's positions, and ``rope_deltas`` is
  set for decoding. Other calls are the stock forward.
- ``get_rope_index``: the same positions from the prompt alone (``generate`` asks before the images are encoded):
  right for the text; the image tokens get the first K_b groups' positions, replaced by the prefill's.

and, on a ``…ForConditionalGeneration``, ``_expand_inputs_for_generation`` (beams, several sequences): each prompt's
images (pixels and grids, or their pre-encoded FlowCut features) are repeated as a group.

With the language-model stage (``llm_stage``, the default; docs/semantics.md) the tower keeps W_b = min(2·target_num,
G₀_b) groups per image and a prompt with images is prefilled by :func:`.lm_stage.prefill`: decoder layers 0 and 1
see each image's W_b tokens at their original M-RoPE positions in place of its K_b placeholders, layer 1 keeps K_b of
them (text-guided), and the later layers and the cache see the prompt's layout, each kept token still at its original
position; text and ``rope_deltas`` count on from the unpruned sequence, as without the stage. ``llm_stage=False``:
the tower stage alone, K_b groups per image.

The processor, when given, writes K_b placeholders per image (its ``replace_image_token``), and refuses videos.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import check_int, require
from . import lm_stage, seams
from .attention import capturing
from .instance import prior_attr, restore_patch, returned, set_attrs
from .policy import scheduled_keep
from .registry import Family, FlowCutConfig
from .schedule import refuse_schedule
from .vlm import check_count, check_processor_owner

#: The ops the tower stage runs.
TOWER_OPS = ("flow_scores_varlen", "topk_select")


@dataclass
class FlowCutQwenImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched Qwen2-VL's ``get_image_features`` returns.

    last_hidden_state: (Σ m·K_b, C_vision) the last tower layer's output on the kept patches, packed image by image.
    pooler_output: B tensors (K_b, C_text), the merged tokens of each image.
    keep_groups: B int64 tensors (K_b,), ascending: the merge groups kept (0 … G₀_b − 1, row-major over (t, h/2, w/2)).
    grid_thw: (B, 3) the images' patch grids (``generate`` may pass these features to the forward without them).
    deepstack_features: Qwen3-VL: one entry per DeepStack tower layer, B tensors (K_b, C_text) each, the kept groups'
        features merged from that layer (in the order of pooler_output); None for a tower without DeepStack.
    """

    keep_groups: tuple[Tensor, ...] | None = None
    grid_thw: Tensor | None = None
    deepstack_features: tuple[tuple[Tensor, ...], ...] | None = None


def classes() -> tuple[type, type]:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLModel

    return Qwen2VLForConditionalGeneration, Qwen2VLModel


def classes_2_5() -> tuple[type, type]:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

    return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel


def qwen_core(model: nn.Module) -> nn.Module:
    """The core (``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``, …: the module holding ``visual``) of a
    ``…ForConditionalGeneration``, or the model itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "visual") else model


def token_counts(core: nn.Module, grid: Tensor, factor: int = 1) -> list[int]:
    """The language-model tokens of each image: K_b = min(target_num, G₀_b), G₀_b = t·h·w / m (with ``factor``:
    min(factor·target_num, G₀_b))."""
    target = factor * core.flowcut_config.target_num
    return [min(target, g) for g in (grid.prod(-1) // core.visual.spatial_merge_size**2).tolist()]


def _check_grid(grid, merge: int) -> Tensor:
    require(
        isinstance(grid, Tensor) and grid.dim() == 2 and grid.shape[1] == 3,
        "image_grid_thw is required: pass the (B, 3) grid the processor returns with pixel_values",
    )
    require(
        bool((grid[:, 1:] % merge == 0).all()) and bool((grid > 0).all()),
        f"image_grid_thw={grid.tolist()} has a height or width the merger cannot take: each must be a multiple of "
        f"spatial_merge_size = {merge}; resize the images with the model's image processor",
    )
    require(  # the stock towers attend within each of the t frames; the group loop within each image
        bool((grid[:, 0] == 1).all()),
        f"image_grid_thw={grid.tolist()} has images of t > 1 frames: an image is one frame (t = 1, as the image "
        f"processor writes it); pass several frames as a video (call flowcut_kernels.remove_flowcut(model) first: "
        f"the patch prunes images only)",
    )
    return grid


def _offsets(lengths, device) -> Tensor:
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def windows(visual: nn.Module, grid: Tensor) -> tuple[Tensor, Tensor]:
    """The tower's group order: (Σ G₀_b,) global merge-group numbers in the order the blocks see them, and the
    window of each (Qwen2-VL: no reorder, one window per image; Qwen2.5-VL: its window reorder)."""
    groups = grid.prod(-1) // visual.spatial_merge_size**2
    if not hasattr(visual, "window_size"):
        return torch.arange(int(groups.sum())), torch.arange(len(groups)).repeat_interleave(groups.cpu())
    order, cu = seams.qwen_window_index(visual, grid)
    lengths = torch.as_tensor(cu).unique_consecutive().diff() // visual.spatial_merge_size**2
    return order.cpu(), torch.arange(len(lengths)).repeat_interleave(lengths)


class PrunedTower(NamedTuple):
    """What :func:`pruned_tower` returns.

    hidden: (Σ m·T_g, C_vision) the last layer's output on the kept patches, packed, each image's groups in its own
        (merge-block) order.
    keep_groups: B (T_g,) int64, ascending.
    deepstack: one entry per DeepStack layer of the tower (Qwen3-VL; none elsewhere): B tensors (T_g, C_text), the
        kept groups' rows of that layer's DeepStack merger output, in the order of ``keep_groups``.
    """

    hidden: Tensor
    keep_groups: tuple[Tensor, ...]
    deepstack: list[tuple[Tensor, ...]]


def pruned_tower(visual: nn.Module, pixels: Tensor, grid: Tensor, targets: list[int], backend: str) -> PrunedTower:
    """Run the tower with FlowCut in merge groups (module docstring).

    Args:
        pixels: (P, C_in·t·p·p) the processor's patches of all images; grid: (B, 3) their (t, h, w) patch grids.
        targets: B ints, the groups each image keeps (T_g ≤ G₀_b).

    Qwen3-VL's tower adds its learned position embedding (resampled to each grid) to the patch embeddings, and after
    each of its ``deepstack_visual_indexes`` layers merges the groups present there with that layer's DeepStack
    merger; a later prune keeps the rows of the groups it keeps, so each kept group ends with its own features of
    every DeepStack layer.
    """
    m = visual.spatial_merge_size**2
    hidden = visual.patch_embed(pixels.type(visual.dtype))
    if hasattr(visual, "pos_embed"):  # Qwen3-VL
        hidden = hidden + seams.qwen_position_embedding(visual, grid).to(hidden.dtype)
    cos, sin = seams.qwen_rotary(visual, grid, hidden)
    number, window = windows(visual, grid)  # per group, in the tower's order
    rows = (number[:, None] * m + torch.arange(m)).flatten().to(hidden.device)
    hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
    groups = (grid.prod(-1) // m).tolist()
    cum = None
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    layers = len(visual.blocks)
    full = getattr(visual, "fullatt_block_indexes", range(layers))
    taps = list(getattr(visual, "deepstack_visual_indexes", ()))
    stacks = []  # per DeepStack layer so far: (groups now, C_text), in the tower's current order
    with capturing(visual.config) as run:
        for layer, block in enumerate(visual.blocks):
            cu = _offsets([g * m for g in groups], hidden.device)
            lengths = window.unique_consecutive(return_counts=True)[1] * m
            run.watch, run.calls = block.attn, []
            hidden = block(
                hidden, cu_seqlens=cu if layer in full else _offsets(lengths.tolist(), hidden.device),
                position_embeddings=(cos, sin),
            )
            if layer in taps:
                stacks.append(visual.deepstack_merger_list[taps.index(layer)](hidden))
            if groups == targets:
                continue
            q, k, v = (torch.cat([call[i] for call in run.calls], dim=2)[0].transpose(0, 1) for i in range(3))
            relay = torch.stack([part.to(compute).mean(0) for part in q.split([g * m for g in groups])]).to(q.dtype)
            cum, entropy, _ = ops.flow_scores_varlen(
                relay, k, v, cu, cum, scale=run.calls[0][3], has_cls=False, backend=backend
            )
            # whole groups: N = G₀ groups, and the prune count's T is T_g + 1 (module docstring)
            keep = scheduled_keep(entropy, groups, targets, layers - layer - 1, relay=0,
                                  rule_target=max(targets) + 1)
            if keep is None:
                continue
            kept = ops.topk_select(
                cum.view(-1, m).sum(1), keep, cu_seqlens=_offsets(groups, cum.device), backend=backend
            ).kept
            rows = (kept[:, None] * m + torch.arange(m, device=kept.device)).flatten()
            hidden, cum, cos, sin = (x[rows] for x in (hidden, cum, cos, sin))
            stacks = [stack[kept] for stack in stacks]
            number, window = number[kept.cpu()], window[kept.cpu()]
            groups = keep
    number, order = number.sort()  # the image's order back: images stay in order, each a contiguous run
    order = order.to(hidden.device)
    hidden = hidden.view(-1, m, hidden.shape[-1])[order].flatten(0, 1)
    first = (grid.prod(-1) // m).cpu().cumsum(0) - grid.prod(-1).cpu() // m  # each image's first global group
    starts = first.repeat_interleave(torch.tensor(groups))
    deepstack = [stack[order].split(groups) for stack in stacks]
    return PrunedTower(hidden, (number - starts).to(hidden.device).split(groups), deepstack)


def _pruned_image_features(self: nn.Module, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs):
    """Patched ``Qwen2VLModel.get_image_features``: a :class:`FlowCutQwenImageFeatures` (a tuple with
    ``return_dict=False``), like the stock method."""
    return_dict = kwargs.pop("return_dict", True)
    require(
        not kwargs.pop("output_attentions", None) and not kwargs.pop("output_hidden_states", None),
        "output_attentions and output_hidden_states are unavailable on a FlowCut-patched Qwen2-VL vision tower; call "
        "flowcut_kernels.remove_flowcut(model) first",
    )
    visual = self.visual
    grid = _check_grid(image_grid_thw, visual.spatial_merge_size)
    require(pixel_values is not None, "pixel_values is required with image_grid_thw")
    backend = ops.resolve_backend(self.flowcut_config.backend, visual.device, visual.dtype, TOWER_OPS)
    targets = token_counts(self, grid, 2 if self.flowcut_config.llm_stage else 1)
    tower = pruned_tower(visual, pixel_values.to(visual.device), grid, targets, backend)
    merged = visual.merger(tower.hidden)
    out = FlowCutQwenImageFeatures(
        last_hidden_state=tower.hidden,
        pooler_output=merged.split([len(k) for k in tower.keep_groups]),
        keep_groups=tower.keep_groups,
        grid_thw=grid,
        deepstack_features=tuple(tower.deepstack) or None,
    )
    return out if return_dict else out.to_tuple()


def mrope_positions(
    core: nn.Module, input_ids: Tensor, mask: Tensor | None, grid: Tensor | None, keep_groups=None, counts=None
):
    """M-RoPE positions of prompts holding K_b placeholders per image (docs/semantics.md).

    Args:
        input_ids: (B, L); mask: (B, L) or None; grid: (G, 3) the images' patch grids, in prompt order, or None.
        keep_groups: G (K_b,) int64 kept merge groups, or None for the first K_b of each image.
        counts: the placeholders of each image in input_ids (default K_b).

    Returns:
        positions (3, B, L) int64: text tokens count on from the unpruned sequence (after an image of llm grid
        (t, h', w') starting at p: p + max(h', w')), each kept token keeps its group's (p + t, p + h, p + w); padding 0.
        deltas (B, 1): the installed release's ``rope_deltas`` for decoding.
    """
    merge = core.visual.spatial_merge_size
    if counts is None:
        counts = token_counts(core, grid) if grid is not None else []
    if keep_groups is None:
        keep_groups = [torch.arange(k) for k in counts]
    mask = torch.ones_like(input_ids) if mask is None else mask
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    per_real_token = seams.rope_deltas_from_real_tokens(core)
    deltas, image = [], 0
    for b in range(len(input_ids)):
        ids = input_ids[b][mask[b].bool()].tolist()
        rows, current, i = [], 0, 0
        while i < len(ids):
            if ids[i] != core.config.image_token_id:
                rows.append(torch.full((3, 1), current))
                current, i = current + 1, i + 1
                continue
            require(image < len(counts), "the prompts hold more image placeholders than image_grid_thw has images")
            _, h, w = (x // merge for x in grid[image].tolist())
            groups = keep_groups[image].cpu()
            rows.append(torch.stack([groups // (h * w), groups // w % h, groups % w]) + current)
            current, i, image = current + max(h, w), i + counts[image], image + 1
        row = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, mask[b].bool()] = row.to(positions.device)
        # the next token (generated text) continues as text would: after a trailing image at p + max(h', w')
        deltas.append(current - (len(ids) if per_real_token else mask.shape[1]) if row.numel() else 0)
    return positions, torch.tensor(deltas, device=input_ids.device)[:, None]


def _decode_positions(core: nn.Module, position_ids, attention_mask, cache, input_ids, inputs_embeds):
    """The M-RoPE positions of a decode step (tokens after a cached prompt): those of text counted on by
    ``rope_deltas``, as the stock forward computes them without ``position_ids``. ``generate`` passes positions that
    continue from its own of the prompt's last token: after a prune those are the text's only when the prompt was
    given with mm_token_type_ids and ends on text. The text row of 4-row position ids (transformers > 5.0) is kept."""
    deltas = getattr(core, "rope_deltas", None)
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None or deltas is None or past == 0:
        return position_ids
    tokens = input_ids if input_ids is not None else inputs_embeds
    batch, length = tokens.shape[:2]
    per_real_token = seams.rope_deltas_from_real_tokens(core)
    if attention_mask is not None and attention_mask.dim() == 2 and per_real_token:
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    else:
        text = torch.arange(past, past + length, device=tokens.device).expand(batch, -1)
    deltas = deltas.to(text.device).repeat_interleave(batch // deltas.shape[0], dim=0)
    mrope = (text + deltas)[None].expand(3, -1, -1).to(position_ids.dtype)
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return torch.cat([position_ids[:1], mrope.to(position_ids.device)])
    return mrope.to(position_ids.device)


def _rope_index(self: nn.Module, *args, **kwargs):
    """Patched ``get_rope_index`` (any release's signature): :func:`mrope_positions` of the prompt alone."""
    bound = inspect.signature(prior_attr(self, "get_rope_index")).bind(*args, **kwargs).arguments
    _refuse_video(bound.get("video_grid_thw"))
    input_ids, grid = bound["input_ids"], bound.get("image_grid_thw")
    if grid is not None:
        check_count(self, int((input_ids == self.config.image_token_id).sum()), token_counts(self, grid))
    return mrope_positions(self, input_ids, bound.get("attention_mask"), grid)


def _refuse_video(video) -> None:
    require(
        video is None,
        "FlowCut's Qwen-VL patches prune images only: videos are not supported; pass images, or call "
        "flowcut_kernels.remove_flowcut(model) to process videos",
    )


def _forward(
    self: nn.Module,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    inputs_embeds=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """Patched ``Qwen2VLModel.forward``: images are pruned and placed with their M-RoPE positions (module docstring),
    then the stock forward runs on the embeddings; calls without images are the stock forward."""
    _refuse_video(pixel_values_videos if video_grid_thw is None else video_grid_thw)
    stock = prior_attr(self, "forward")
    cache = seams.pop_cache(kwargs)
    encoded = (mm_encoder_outputs or {}).get("image")
    if mm_encoder_outputs is not None:  # transformers > 5.0 only
        kwargs["mm_encoder_outputs"] = {**mm_encoder_outputs, "image": None}
    if pixel_values is None and encoded is None:
        position_ids = _decode_positions(self, position_ids, attention_mask, cache, input_ids, inputs_embeds)
        return stock(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            image_grid_thw=image_grid_thw, **seams.cache_arg(cache), **kwargs,
        )
    require(input_ids is not None, "a Qwen2-VL prompt with images needs input_ids (for its M-RoPE positions)")
    if encoded is None:
        encoded = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    require(
        isinstance(encoded, FlowCutQwenImageFeatures),
        "mm_encoder_outputs['image'] must come from the FlowCut-patched get_image_features of this model",
    )
    placeholders = input_ids == self.config.image_token_id
    counts = [min(len(k), self.flowcut_config.target_num) for k in encoded.keep_groups]
    check_count(self, int(placeholders.sum()), counts)
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    if self.flowcut_config.llm_stage:
        return _staged_prefill(self, input_ids, attention_mask, inputs_embeds, encoded, counts, cache, kwargs)
    features = torch.cat(encoded.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
    inputs_embeds = inputs_embeds.masked_scatter(placeholders[..., None].to(inputs_embeds.device), features)
    positions, self.rope_deltas = mrope_positions(
        self, input_ids, attention_mask, encoded.grid_thw, encoded.keep_groups
    )
    kwargs.pop("mm_token_type_ids", None)
    if encoded.deepstack_features is not None:
        return _deepstack_forward(self, attention_mask, positions, inputs_embeds, placeholders, encoded, cache, kwargs)
    out = stock(
        attention_mask=attention_mask, position_ids=positions, inputs_embeds=inputs_embeds, **seams.cache_arg(cache),
        **kwargs,
    )
    return seams.with_image_outputs(out, encoded)


#: Arguments of the core's forward that its language model does not take.
_CORE_ONLY = ("cache_position", "mm_token_type_ids", "mm_encoder_outputs", "second_per_grid_ts", "rope_deltas")


def deepstack_embeds(encoded: FlowCutQwenImageFeatures) -> list[Tensor]:
    """Per DeepStack layer, (Σ K_b, C_text): the kept tokens' features, image after image (the placeholders'
    order)."""
    return [torch.cat(layer) for layer in encoded.deepstack_features]


def _deepstack_forward(self: nn.Module, attention_mask, positions, inputs_embeds, placeholders, encoded, cache, kwargs):
    """The prefill of a DeepStack model (Qwen3-VL) without the stage: its language model on the embeddings, each
    DeepStack layer's features of the kept tokens added at their placeholders (the stock forward would take them
    only from pixels it encodes itself)."""
    return_dict = kwargs.pop("return_dict", None)
    for name in _CORE_ONLY:
        kwargs.pop(name, None)
    out = self.language_model(
        input_ids=None, attention_mask=attention_mask, position_ids=positions, inputs_embeds=inputs_embeds,
        visual_pos_masks=placeholders, deepstack_visual_embeds=deepstack_embeds(encoded), **seams.cache_arg(cache),
        **kwargs,
    )
    out = seams.vlm_output(self, out, encoded, rope_deltas=self.rope_deltas)
    return returned(self, out, return_dict)


def _staged_prefill(self: nn.Module, input_ids, attention_mask, inputs_embeds, encoded, counts, cache, kwargs):
    """The prefill with the language-model stage: each image's W_b = min(2·target_num, G₀_b) tower-stage tokens at
    their own M-RoPE positions in the long layout, K_b of them kept at layer ``PRUNE_LAYER`` with their positions."""
    require(
        not kwargs.pop("output_attentions", None),
        "output_attentions=True is unavailable with llm_stage: the stage's prefill never builds the attention matrix; "
        "call flowcut_kernels.remove_flowcut(model) first",
    )
    require(
        attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask[:, -1].all())),
        "llm_stage takes a (B, L) attention_mask of prompts padded on the left (the last token is each prompt's "
        "relay): set tokenizer.padding_side = 'left'",
    )
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    features = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in encoded.pooler_output]
    placeholders = input_ids == self.config.image_token_id
    layout = lm_stage.expand(inputs_embeds, mask, placeholders, features, counts)
    long_ids = torch.full_like(layout.mask, self.config.image_token_id)  # the image rows; padding is masked
    text = ~placeholders & mask.bool()
    long_ids[text.nonzero()[:, 0], layout.rows[text]] = input_ids[text]
    long_positions, _ = mrope_positions(
        self, long_ids, layout.mask, encoded.grid_thw, encoded.keep_groups, [len(f) for f in features]
    )
    _, self.rope_deltas = mrope_positions(  # the text's positions and the end: the same with any kept tokens
        self, input_ids, attention_mask, encoded.grid_thw, [k[:c] for k, c in zip(encoded.keep_groups, counts)]
    )
    return_dict = kwargs.pop("return_dict", None)
    for name in _CORE_ONLY:
        kwargs.pop(name, None)
    out = lm_stage.prefill(
        self.language_model, layout, counts, positions=None, long_positions=long_positions.to(mask.device),
        mask=attention_mask, cache=cache, backend=self.flowcut_config.backend,
        deepstack=deepstack_embeds(encoded) if encoded.deepstack_features is not None else None, **kwargs,
    )
    out = seams.vlm_output(self, out, encoded, rope_deltas=self.rope_deltas)
    return returned(self, out, return_dict)


def _expand_by_prompt(self: nn.Module, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
    """The outer model's ``_expand_inputs_for_generation`` (beams, num_return_sequences): each prompt's images are
    repeated as a group, [A1, A2] → [A1, A2, A1, A2] — their pixels and grids, or the FlowCut features ``generate``
    encoded before (whose pooled tokens, 2·K per image with the stage, do not match the prompt's K placeholders that
    the stock expansion counts, and whose kept groups and grids it does not expand)."""
    stock = seams.stock_expand_inputs(self)
    if expand_size == 1:
        return stock(expand_size=1, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
    core = qwen_core(self)
    encoded_all = model_kwargs.get("mm_encoder_outputs") or {}
    encoded = encoded_all.get("image")
    ours = isinstance(encoded, FlowCutQwenImageFeatures) and encoded.grid_thw is not None
    if ours:
        model_kwargs["mm_encoder_outputs"] = {**encoded_all, "image": None}
    images = {name: model_kwargs.pop(name, None) for name in ("pixel_values", "image_grid_thw")}
    input_ids, model_kwargs = stock(
        expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
    )
    grid = encoded.grid_thw if ours else images["image_grid_thw"]
    if grid is None:
        model_kwargs.update({k: v for k, v in images.items() if v is not None})
        return input_ids, model_kwargs
    counts = token_counts(core, grid)
    order = [g for g in range(len(counts)) for _ in range(expand_size)]  # stock's, if the prompts do not match
    if input_ids is not None:
        per_prompt = (input_ids[::expand_size] == core.config.image_token_id).sum(1).tolist()
        groups, first = [], 0
        for total in per_prompt:
            last, seen = first, 0
            while seen < total and last < len(counts):
                seen, last = seen + counts[last], last + 1
            groups.append(list(range(first, last)))
            first = last
        if first == len(counts) and [sum(counts[g] for g in group) for group in groups] == per_prompt:
            order = [g for group in groups for _ in range(expand_size) for g in group]
    index = torch.tensor(order, dtype=torch.long)
    if ours:
        merge = core.visual.spatial_merge_size ** 2
        rows = encoded.last_hidden_state.split([merge * len(k) for k in encoded.keep_groups])
        model_kwargs["mm_encoder_outputs"]["image"] = FlowCutQwenImageFeatures(
            last_hidden_state=torch.cat([rows[g] for g in order]),
            pooler_output=tuple(encoded.pooler_output[g] for g in order),
            keep_groups=tuple(encoded.keep_groups[g] for g in order),
            grid_thw=encoded.grid_thw[index.to(encoded.grid_thw.device)],
            deepstack_features=None if encoded.deepstack_features is None else tuple(
                tuple(layer[g] for g in order) for layer in encoded.deepstack_features
            ),
        )
    if images["image_grid_thw"] is not None:
        model_kwargs["image_grid_thw"] = images["image_grid_thw"][index.to(images["image_grid_thw"].device)]
    if images["pixel_values"] is not None:
        patches = images["pixel_values"].split(images["image_grid_thw"].prod(-1).tolist())
        model_kwargs["pixel_values"] = torch.cat([patches[g] for g in order])
    return input_ids, model_kwargs


def _replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
    """The patched processor's placeholders for one image: min(target_num, merged tokens)."""
    tokens = int(image_inputs["image_grid_thw"][image_idx].prod()) // self.image_processor.merge_size**2
    return self.image_token * min(self._flowcut_target, tokens)


def _replace_video_token(self, *args, **kwargs) -> str:
    _refuse_video(True)


def check_processor(processor, core: nn.Module, processor_class: str) -> None:
    """``processor``: this model's processor (a ``transformers.<processor_class>``), with the hook FlowCut sets, not
    patched for another model."""
    import transformers

    expected = getattr(transformers, processor_class)
    require(
        isinstance(processor, expected),
        f"processor is a {type(processor).__name__}; pass the model's {expected.__name__} (AutoProcessor."
        f"from_pretrained of the same checkpoint), whose image-token count FlowCut adjusts",
    )
    require(
        processor.image_token_id == core.config.image_token_id
        and processor.image_processor.merge_size == core.visual.spatial_merge_size,
        f"processor does not match the model: image token id {processor.image_token_id} and merge size "
        f"{processor.image_processor.merge_size}, the model's are {core.config.image_token_id} and "
        f"{core.visual.spatial_merge_size}; pass the processor of the model's checkpoint",
    )
    check_processor_owner(processor, core)


def patch_qwen(model: nn.Module, target_num: int, *, name: str, processor_class: str, feature_layer=None,
               backend="auto", processor=None, llm_stage=None, schedule=None) -> None:
    """Check every argument, then patch ``model`` (and ``processor``, a ``transformers.<processor_class>``) of the
    Qwen family ``name``; see the module docstring."""
    core = qwen_core(model)
    refuse_schedule(schedule, name)
    target_num = check_int("target_num", target_num, 1)
    require(feature_layer is None, f"feature_layer does not apply to {name} (the merger takes the last layer); "
                                   "leave it unset")
    require(llm_stage in (None, False, True), f"llm_stage must be True, False or None, got {llm_stage!r}")
    llm_stage = llm_stage is not False  # the spec's default for Qwen: with the stage
    ops.resolve_backend(backend, core.visual.device, core.visual.dtype, TOWER_OPS)
    if llm_stage:
        lm_stage.check_decoder(core.language_model, backend)
    if processor is not None:
        check_processor(processor, core, processor_class)
    else:
        processor = vars(core).get("_flowcut_processor")  # a re-apply keeps the model's processor
    counting = seams.qwen_counts(processor, _replace_image_token, _replace_video_token) if processor is not None else {}
    unpatch_qwen2_vl(model)
    config = FlowCutConfig(target_num, None, backend, llm_stage)
    if processor is not None:
        set_attrs(processor, _flowcut_target=target_num, **counting)
    set_attrs(
        core,
        get_image_features=types.MethodType(_pruned_image_features, core),
        get_rope_index=types.MethodType(_rope_index, core),
        forward=types.MethodType(_forward, core),
        flowcut_config=config,
        _flowcut_processor=processor,
    )
    if model is not core:
        set_attrs(model, flowcut_config=config,
                  _expand_inputs_for_generation=types.MethodType(_expand_by_prompt, model))


def unpatch_qwen2_vl(model: nn.Module) -> None:
    """Undo :func:`patch_qwen`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, qwen_core(model))


FAMILY = Family(
    "qwen2_vl", classes, functools.partial(patch_qwen, name="Qwen2-VL", processor_class="Qwen2VLProcessor"),
    unpatch_qwen2_vl,
)
FAMILY_2_5 = Family(
    "qwen2_5_vl", classes_2_5, functools.partial(patch_qwen, name="Qwen2.5-VL", processor_class="Qwen2_5_VLProcessor"),
    unpatch_qwen2_vl,
)

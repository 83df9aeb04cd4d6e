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

**Videos** (``pixel_values_videos``, ``video_grid_thw``; ``get_video_features`` patched too): a video of grid (t, h, w)
keeps K_v = min(target_num, G₀) groups, frame f ⌊K_v/t⌋ of them and the first K_v mod t frames one more
(:func:`frame_split`); the towers attend within each frame, so each frame is pruned as an image with its share, in
the same tower pass. Images and video frames are **units** of the prompt (:func:`placeholder_units`); M-RoPE positions
are the model's own ``get_rope_index`` on the unpruned prompt, taken at the text and the kept groups
(:func:`mrope_positions`: Qwen2.5-VL's temporal scaling and Qwen3-VL's timestamps come with it).

The processor, when given, writes K_b placeholders per image (its ``replace_image_token``) and each video's frames'
shares of K_v in the stock video text (its ``replace_video_token``).
"""

from __future__ import annotations

import functools
import inspect
import re
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
from .vlm import check_count, check_processor_class

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


def frame_split(total: int, frames: int) -> list[int]:
    """How a video's ``total`` tokens spread over its ``frames`` (t) frames: evenly, the first total mod t frames
    one more (an image: one frame, all of them)."""
    return [total // frames + (f < total % frames) for f in range(frames)]


def frame_counts(core: nn.Module, grid: Tensor, factor: int = 1) -> list[list[int]]:
    """Per image or video (grid rows (t, h, w)), the tokens each of its t frames keeps: K_v = min(factor·target_num,
    G₀), G₀ = t·h·w / m, by :func:`frame_split`."""
    target, merge = factor * core.flowcut_config.target_num, core.visual.spatial_merge_size**2
    return [frame_split(min(target, t * h * w // merge), t) for t, h, w in grid.tolist()]


def token_counts(core: nn.Module, grid: Tensor, factor: int = 1) -> list[int]:
    """The language-model tokens of each image or video: K_b = min(target_num, G₀_b), G₀_b = t·h·w / m (with
    ``factor``: min(factor·target_num, G₀_b))."""
    return [sum(counts) for counts in frame_counts(core, grid, factor)]


def first_groups(core: nn.Module, grid: Tensor, factor: int = 1) -> list[Tensor]:
    """Per image or video, groups in the counts of :func:`frame_counts`: the first K_f of each frame f (numbered in
    the image or video, row-major over (t, h', w')); where placeholders stand before the tower has run."""
    merge = core.visual.spatial_merge_size**2
    return [torch.cat([torch.arange(k) + f * (h * w // merge) for f, k in enumerate(counts)])
            for (_, h, w), counts in zip(grid.tolist(), frame_counts(core, grid, factor))]


def _check_grid(grid, merge: int, kind: str, target: int) -> Tensor:
    name, pixels = ("image_grid_thw", "pixel_values") if kind == "image" else ("video_grid_thw", "pixel_values_videos")
    require(
        isinstance(grid, Tensor) and grid.dim() == 2 and grid.shape[1] == 3,
        f"{name} is required: pass the (B, 3) grid the processor returns with {pixels}",
    )
    require(
        bool((grid[:, 1:] % merge == 0).all()) and bool((grid > 0).all()),
        f"{name}={grid.tolist()} has a height or width the merger cannot take: each must be a multiple of "
        f"spatial_merge_size = {merge}; resize the {kind}s with the model's {kind} processor",
    )
    require(  # the stock towers attend within each of the t frames; the group loop within each image
        kind == "video" or bool((grid[:, 0] == 1).all()),
        f"image_grid_thw={grid.tolist()} has images of t > 1 frames: an image is one frame (t = 1, as the image "
        f"processor writes it); pass several frames as a video (pixel_values_videos, video_grid_thw)",
    )
    require(
        bool((grid[:, 0] <= target).all()),
        f"video_grid_thw={grid.tolist()} has a video of more frames than target_num = {target} tokens: FlowCut keeps "
        f"at least one token of each frame (t = frames / temporal_patch_size); sample fewer frames, or patch with a "
        f"larger target_num",
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


def pruned_media(visual: nn.Module, pixels: Tensor, grid: Tensor, counts: list[list[int]], backend: str
                 ) -> PrunedTower:
    """:func:`pruned_tower` on images and videos: each frame is pruned as an image of its own (the towers attend
    within each frame), all in one pass.

    Args:
        pixels: (P, C_in·t·p·p) the patches of the images or videos, each frame after frame; grid: (B, 3) their
            (t, h, w); counts: B lists, the groups each of the t frames keeps (:func:`frame_counts`).

    Returns the :class:`PrunedTower` of the B images or videos: ``keep_groups`` (Σ_f counts[b][f],) numbered in the
    image or video (frame f's group g is f·h'·w' + g), DeepStack rows per image or video.
    """
    merge = visual.spatial_merge_size**2
    frames = grid.repeat_interleave(grid[:, 0], dim=0)
    frames[:, 0] = 1
    tower = pruned_tower(visual, pixels, frames, [k for per in counts for k in per], backend)
    sizes = [sum(per) for per in counts]
    offsets = [f * (h * w // merge) for t, h, w in grid.tolist() for f in range(t)]
    keep = torch.cat([k + o for k, o in zip(tower.keep_groups, offsets)]).split(sizes)
    return PrunedTower(tower.hidden, keep, [torch.cat(layer).split(sizes) for layer in tower.deepstack])


def _encode(self: nn.Module, kind: str, pixels: Tensor, grid: Tensor, kwargs: dict):
    """The patched ``get_image_features`` / ``get_video_features`` (``kind``): a :class:`FlowCutQwenImageFeatures`
    (a tuple with ``return_dict=False``), like the stock methods. A video of grid (t, h, w) is its t frames, each
    pruned as an image to its share of the video's tokens (:func:`frame_counts`), all in one tower pass; its
    ``keep_groups`` are numbered in the video (frame f's group g is f·h'·w' + g)."""
    return_dict = kwargs.pop("return_dict", True)
    require(
        not kwargs.pop("output_attentions", None) and not kwargs.pop("output_hidden_states", None),
        "output_attentions and output_hidden_states are unavailable on a FlowCut-patched Qwen-VL vision tower; call "
        "flowcut_kernels.remove_flowcut(model) first",
    )
    visual = self.visual
    grid = _check_grid(grid, visual.spatial_merge_size, kind, self.flowcut_config.target_num)
    require(pixels is not None, f"the {kind}s' pixels are required with their grid")
    backend = ops.resolve_backend(self.flowcut_config.backend, visual.device, visual.dtype, TOWER_OPS)
    counts = frame_counts(self, grid, 2 if self.flowcut_config.llm_stage else 1)
    tower = pruned_media(visual, pixels.to(visual.device), grid, counts, backend)
    out = FlowCutQwenImageFeatures(
        last_hidden_state=tower.hidden,
        pooler_output=visual.merger(tower.hidden).split([len(k) for k in tower.keep_groups]),
        keep_groups=tower.keep_groups,
        grid_thw=grid,
        deepstack_features=tuple(tower.deepstack) or None,
    )
    return out if return_dict else out.to_tuple()


def _pruned_image_features(self: nn.Module, pixel_values: Tensor, image_grid_thw: Tensor | None = None, **kwargs):
    """Patched ``get_image_features``: :func:`_encode` of the images."""
    return _encode(self, "image", pixel_values, image_grid_thw, kwargs)


def _pruned_video_features(self: nn.Module, pixel_values_videos: Tensor, video_grid_thw: Tensor | None = None,
                           **kwargs):
    """Patched ``get_video_features``: :func:`_encode` of the videos."""
    return _encode(self, "video", pixel_values_videos, video_grid_thw, kwargs)


#: The visual inputs of a Qwen-VL prompt; units (an image, or one frame of a video) are numbered kind by kind.
KINDS = ("image", "video")


def _token(core: nn.Module, kind: str) -> int:
    return core.config.image_token_id if kind == "image" else core.config.video_token_id


class Unit(NamedTuple):
    """An image, or one frame of a video: its ``kind``, ``count`` placeholders, and ``frame``: the groups of the
    whole frame (h'·w', written out in the unpruned prompt)."""

    kind: str
    count: int
    frame: int


def _units(core: nn.Module, kept: dict) -> list[Unit]:
    """The units of ``kept`` (:func:`mrope_positions`), kind by kind, each image or video's frames in order."""
    merge = core.visual.spatial_merge_size**2
    units = []
    for kind, (grid, groups) in kept.items():
        for (t, h, w), mine in zip(grid.tolist(), groups):
            frame = h * w // merge
            units += [Unit(kind, n, frame) for n in torch.bincount(mine.cpu() // frame, minlength=t).tolist()]
    return units


def placeholder_units(core: nn.Module, input_ids: Tensor, units: list[Unit]) -> tuple[Tensor, Tensor]:
    """Which unit each placeholder belongs to.

    Args:
        input_ids: (B, L); units: images and video frames, kind by kind (:data:`KINDS` order), each kind's in order.

    Returns:
        marks (B, L) bool: the image and video placeholders; unit (N,) int64: each placeholder's unit (an index into
        ``units``), row-major. The prompts must hold each kind's count and each unit's placeholders in one run.
    """
    marks = (input_ids == core.config.image_token_id) | (input_ids == core.config.video_token_id)
    tokens = input_ids[marks]
    unit = torch.empty_like(tokens)
    for kind in KINDS:
        mine = [i for i, u in enumerate(units) if u.kind == kind]
        here = tokens == _token(core, kind)
        counts = [units[i].count for i in mine]
        check_count(core, int(here.sum()), counts, kind)
        unit[here] = torch.tensor(mine, dtype=torch.long, device=unit.device).repeat_interleave(
            torch.tensor(counts, dtype=torch.long, device=unit.device))
    require(
        len(unit.unique_consecutive()) == len(units),
        "each image's placeholder tokens, and each video frame's, must be consecutive, as the processor writes them",
    )
    return marks, unit


def mrope_positions(core: nn.Module, input_ids: Tensor, mask: Tensor | None, kept: dict, time=None):
    """M-RoPE positions of prompts whose placeholders stand for the merge groups ``kept`` (docs/semantics.md).

    Args:
        input_ids: (B, L); mask: (B, L) or None.
        kept: kind ("image", "video") → (grid (n, 3), n int64 tensors): each image or video's groups whose
            placeholders the prompts hold, ascending, numbered in the image or video (row-major over (t, h', w')),
            in prompt order; a kind the prompts do not hold may be left out.
        time: Qwen2.5-VL's ``second_per_grid_ts`` (the videos' seconds per temporal patch), or None.

    Returns:
        positions (3, B, L) int64: the stock positions of the unpruned prompts (each frame's placeholders written out
        whole, h'·w' of them), taken at the text and at the kept groups: text counts on from the unpruned sequence;
        padding 0. deltas (B, 1): the installed release's ``rope_deltas`` for decoding (the next token at the
        unpruned prompt's highest position + 1).
    """
    units = _units(core, kept)
    mask = torch.ones_like(input_ids) if mask is None else mask
    marks, unit = placeholder_units(core, input_ids, units)
    # the unpruned prompts: a unit's first placeholder stands for its frame's h'·w' tokens, its others for none
    first = torch.ones_like(unit, dtype=torch.bool)
    first[1:] = unit[1:] != unit[:-1]
    widths = torch.tensor([u.frame for u in units], device=unit.device)[unit]
    repeats = mask.long() * ~marks
    repeats[marks] = torch.where(first, widths, 0)
    lengths = repeats.sum(1)
    full = int(lengths.max())
    long_ids = torch.zeros(len(input_ids), full, dtype=input_ids.dtype, device=input_ids.device)
    long_mask = torch.zeros_like(long_ids)
    for b, (row, n) in enumerate(zip(input_ids, lengths.tolist())):
        long_ids[b, full - n:] = row.repeat_interleave(repeats[b])
        long_mask[b, full - n:] = 1
    grids = {kind: grid for kind, (grid, _) in kept.items()}
    stock = seams.qwen_stock_positions(
        prior_attr(core, "get_rope_index"), core.config, long_ids, long_mask, grids.get("image"), grids.get("video"),
        time,
    )
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    text = mask.bool() & ~marks
    start = repeats.cumsum(1) - repeats + (full - lengths)[:, None]
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(input_ids)
    positions[:, text] = stock[:, rows[text], start[text]].long()
    for kind, (grid, groups) in kept.items():
        columns = stock[:, long_ids == _token(core, kind)]  # each image or video's groups, in order
        sizes = (grid.prod(-1) // core.visual.spatial_merge_size**2).tolist()
        index = torch.cat([g.to(columns.device) + sum(sizes[:n]) for n, g in enumerate(groups)])
        positions[:, input_ids == _token(core, kind)] = columns[:, index].long()
    end = stock.masked_fill(~long_mask.bool(), -1).amax(dim=(0, 2)) + 1
    length = mask.sum(1) if seams.rope_deltas_from_real_tokens(core) else input_ids.shape[1]
    return positions, (end - length)[:, None]


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
    """Patched ``get_rope_index`` (any release's signature): :func:`mrope_positions` of the prompt alone, each frame's
    placeholders at its first groups."""
    bound = inspect.signature(prior_attr(self, "get_rope_index")).bind(*args, **kwargs).arguments
    grids = {kind: bound.get(f"{kind}_grid_thw") for kind in KINDS}
    kept = {kind: (grid, first_groups(self, grid)) for kind, grid in grids.items() if grid is not None}
    return mrope_positions(self, bound["input_ids"], bound.get("attention_mask"), kept, bound.get("second_per_grid_ts"))


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
    """Patched ``Qwen2VLModel.forward``: images and videos are pruned and placed with their M-RoPE positions (module
    docstring), then the stock forward runs on the embeddings; calls without them are the stock forward."""
    stock = prior_attr(self, "forward")
    cache = seams.pop_cache(kwargs)
    encoded = {kind: (mm_encoder_outputs or {}).get(kind) for kind in KINDS}
    if mm_encoder_outputs is not None:  # transformers > 5.0 only
        kwargs["mm_encoder_outputs"] = {**mm_encoder_outputs, "image": None, "video": None}
    if pixel_values is None and pixel_values_videos is None and all(e is None for e in encoded.values()):
        position_ids = _decode_positions(self, position_ids, attention_mask, cache, input_ids, inputs_embeds)
        return stock(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, **seams.cache_arg(cache), **kwargs,
        )
    require(input_ids is not None, "a Qwen-VL prompt with images or videos needs input_ids (for its M-RoPE positions)")
    if encoded["image"] is None and pixel_values is not None:
        encoded["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    if encoded["video"] is None and pixel_values_videos is not None:
        encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
    encoded = {kind: features for kind, features in encoded.items() if features is not None}
    for kind, features in encoded.items():
        require(
            isinstance(features, FlowCutQwenImageFeatures),
            f"mm_encoder_outputs['{kind}'] must come from the FlowCut-patched get_{kind}_features of this model",
        )
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    time = kwargs.get("second_per_grid_ts")
    if self.flowcut_config.llm_stage:
        return _staged_prefill(self, input_ids, attention_mask, inputs_embeds, encoded, time, cache, kwargs)
    kept = {kind: (features.grid_thw, list(features.keep_groups)) for kind, features in encoded.items()}
    positions, self.rope_deltas = mrope_positions(self, input_ids, attention_mask, kept, time)
    marks, features = _joint(self, input_ids, {kind: torch.cat(f.pooler_output) for kind, f in encoded.items()})
    inputs_embeds = inputs_embeds.masked_scatter(marks[..., None].to(inputs_embeds.device),
                                                 features.to(inputs_embeds.device, inputs_embeds.dtype))
    kwargs.pop("mm_token_type_ids", None)
    if any(f.deepstack_features is not None for f in encoded.values()):
        return _deepstack_forward(self, attention_mask, positions, inputs_embeds, marks, encoded, input_ids, cache,
                                  kwargs)
    out = stock(
        attention_mask=attention_mask, position_ids=positions, inputs_embeds=inputs_embeds, **seams.cache_arg(cache),
        **kwargs,
    )
    return seams.with_image_outputs(out, encoded.get("image"), encoded.get("video"))


def _joint(core: nn.Module, input_ids: Tensor, rows: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The image and video placeholders (B, L) bool, and (N, C) the ``rows`` of each kind (kind → its tokens' rows,
    image after image or video after video) at its kind's placeholders, row-major."""
    marks = (input_ids == core.config.image_token_id) | (input_ids == core.config.video_token_id)
    tokens = input_ids[marks]
    some = next(iter(rows.values()))
    joint = some.new_empty(len(tokens), some.shape[-1])
    for kind, x in rows.items():
        joint[tokens == _token(core, kind)] = x.to(joint.device, joint.dtype)
    return marks, joint


#: Arguments of the core's forward that its language model does not take.
_CORE_ONLY = ("cache_position", "mm_token_type_ids", "mm_encoder_outputs", "second_per_grid_ts", "rope_deltas")


def _deepstack_forward(self: nn.Module, attention_mask, positions, inputs_embeds, marks, encoded, input_ids, cache,
                       kwargs):
    """The prefill of a DeepStack model (Qwen3-VL) without the stage: its language model on the embeddings, each
    DeepStack layer's features of the kept tokens added at their placeholders (the stock forward would take them
    only from pixels it encodes itself)."""
    return_dict = kwargs.pop("return_dict", None)
    for name in _CORE_ONLY:
        kwargs.pop(name, None)
    layers = len(next(f.deepstack_features for f in encoded.values()))
    deepstack = [_joint(self, input_ids, {kind: torch.cat(f.deepstack_features[i]) for kind, f in encoded.items()})[1]
                 for i in range(layers)]
    out = self.language_model(
        input_ids=None, attention_mask=attention_mask, position_ids=positions, inputs_embeds=inputs_embeds,
        visual_pos_masks=marks, deepstack_visual_embeds=deepstack, **seams.cache_arg(cache), **kwargs,
    )
    out = seams.vlm_output(self, out, encoded.get("image"), video_outputs=encoded.get("video"),
                           rope_deltas=self.rope_deltas)
    return returned(self, out, return_dict)


def _frames_of(core: nn.Module, features: FlowCutQwenImageFeatures, rows) -> list:
    """``rows`` (one tensor per image or video, a row per kept group, in ``keep_groups`` order) split frame by frame:
    a list over the units (images, video frames) of ``features``."""
    merge = core.visual.spatial_merge_size**2
    out = []
    for (t, h, w), groups, mine in zip(features.grid_thw.tolist(), features.keep_groups, rows):
        out += mine.split(torch.bincount(groups.cpu() // (h * w // merge), minlength=t).tolist())
    return out


def _staged_prefill(self: nn.Module, input_ids, attention_mask, inputs_embeds, encoded, time, cache, kwargs):
    """The prefill with the language-model stage: each image's (each video frame's) W tower-stage tokens at their
    own M-RoPE positions in the long layout, K of them kept at layer ``PRUNE_LAYER`` with their positions."""
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
    short = {kind: (f.grid_thw, first_groups(self, f.grid_thw)) for kind, f in encoded.items()}
    units = _units(self, short)
    marks, unit = placeholder_units(self, input_ids, units)
    order = unit.unique_consecutive().tolist()  # the units in the placeholders' order
    frames = [row for f in encoded.values() for row in _frames_of(self, f, f.pooler_output)]
    features = [frames[u].to(inputs_embeds.device, inputs_embeds.dtype) for u in order]
    counts = [units[u].count for u in order]
    layout = lm_stage.expand(inputs_embeds, mask, marks, features, counts)
    long_ids = torch.zeros_like(layout.mask)
    for (b, first, last), u in zip(layout.segments, order):  # the units' rows; padding is masked
        long_ids[b, first:last] = _token(self, units[u].kind)
    text = ~marks & mask.bool()
    long_ids[text.nonzero()[:, 0], layout.rows[text]] = input_ids[text]
    kept = {kind: (f.grid_thw, list(f.keep_groups)) for kind, f in encoded.items()}
    long_positions, _ = mrope_positions(self, long_ids, layout.mask, kept, time)
    # the text's positions and the end: the same with any kept tokens
    _, self.rope_deltas = mrope_positions(self, input_ids, attention_mask, short, time)
    deepstack = None
    if any(f.deepstack_features is not None for f in encoded.values()):
        layers = len(next(f.deepstack_features for f in encoded.values()))
        deepstack = []
        for i in range(layers):
            per_unit = [row for f in encoded.values() for row in _frames_of(self, f, f.deepstack_features[i])]
            deepstack.append(torch.cat([per_unit[u] for u in order]))
    return_dict = kwargs.pop("return_dict", None)
    for name in _CORE_ONLY:
        kwargs.pop(name, None)
    out = lm_stage.prefill(
        self.language_model, layout, counts, positions=None, long_positions=long_positions.to(mask.device),
        mask=attention_mask, cache=cache, backend=self.flowcut_config.backend, deepstack=deepstack, **kwargs,
    )
    out = seams.vlm_output(self, out, encoded.get("image"), video_outputs=encoded.get("video"),
                           rope_deltas=self.rope_deltas)
    return returned(self, out, return_dict)


def _expand_by_prompt(self: nn.Module, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
    """The outer model's ``_expand_inputs_for_generation`` (beams, num_return_sequences): each prompt's images are
    repeated as a group, [A1, A2] → [A1, A2, A1, A2] — their pixels and grids, or the FlowCut features ``generate``
    encoded before (whose pooled tokens, 2·K per image with the stage, do not match the prompt's K placeholders that
    the stock expansion counts, and whose kept groups and grids it does not expand)."""
    stock = seams.stock_expand_inputs(self)
    if expand_size == 1:
        return stock(expand_size=1, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
    require(
        model_kwargs.get("pixel_values_videos") is None and (model_kwargs.get("mm_encoder_outputs") or {}).get(
            "video") is None,
        "beam search and num_return_sequences > 1 are unavailable with videos on a FlowCut-patched Qwen-VL model: "
        "generate with num_beams=1 and one sequence per prompt, or call flowcut_kernels.remove_flowcut(model) first",
    )
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


def _replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
    """The patched processor's text for one video: the stock text (Qwen3-VL: timestamps and a run per frame) with
    min(target_num, merged tokens) placeholders, frame f's run holding its share (:func:`frame_split`)."""
    t, h, w = video_inputs["video_grid_thw"][video_idx].tolist()
    frame = h * w // self.video_processor.merge_size**2
    require(
        t <= self._flowcut_target,
        f"a video of t = {t} frames (after temporal patching) is more than target_num = {self._flowcut_target} "
        f"tokens: FlowCut keeps at least one token of each frame; sample fewer frames, or patch with a larger "
        f"target_num",
    )
    shares = iter(frame_split(min(self._flowcut_target, t * frame), t))
    token = self.video_token

    def run(found) -> str:  # a run of whole frames' placeholders → their shares
        return token * sum(next(shares) for _ in range(len(found.group(0)) // len(token) // frame))

    return re.sub(f"(?:{re.escape(token)})+", run, seams.qwen_stock_video_text(self, video_inputs, video_idx, **kwargs))


def check_processor(processor, core: nn.Module, processor_class: str) -> None:
    """``processor``: this model's processor (a ``transformers.<processor_class>``), with the hook FlowCut sets, not
    patched for another model."""
    import transformers

    expected = getattr(transformers, processor_class)
    check_processor_class(processor, core, expected)
    require(
        processor.image_token_id == core.config.image_token_id
        and processor.image_processor.merge_size == core.visual.spatial_merge_size,
        f"processor does not match the model: image token id {processor.image_token_id} and merge size "
        f"{processor.image_processor.merge_size}, the model's are {core.config.image_token_id} and "
        f"{core.visual.spatial_merge_size}; pass the processor of the model's checkpoint",
    )


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
        get_video_features=types.MethodType(_pruned_video_features, core),
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

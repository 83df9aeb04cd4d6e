"""FlowCut for HF InternVL (``InternVLForConditionalGeneration`` / ``InternVLModel``) and its ``InternVLProcessor``.

The processor crops an image into n tiles of the tower's side (448²), plus a thumbnail (the whole image) when it
takes more than one; the tiles of all images reach the model as one (ΣT, 3, S, S) tensor. InternViT (a CLS row, then
s × s patches) encodes each tile; the model drops the CLS row, pixel-shuffles each k × k block of patches (k =
1/downsample_ratio = 2) into one token — t² = (s/k)² tokens a tile (256) — and projects them. FlowCut (CLS variant,
docs/semantics.md) prunes in **pixel-shuffle groups**, so that every token the language model gets is the stock token
of one group:

- layer 0's input is reordered group by group (after the CLS row): group (gy, gx) in raster order, its m = k² members
  in raster order — nothing changes in the tower (the position embeddings are added before; attention is
  order-free);
- the feature layer is the last, F = L − 1; layers 0 … F − 1 are scored (relay = the tile's CLS query, the q/k/v the
  attention receives, after InternViT's q/k norms), rpl = F − ℓ − 1; a group's score is the sum of its members'
  S_cum, the entropy Hn the patch-level one;
- an image of n tiles (processor order, thumbnail last) keeps K = ``target_num`` tokens: tile j keeps f_j =
  ⌊K/n⌋ groups, plus one for the last K mod n tiles (the thumbnail first). Its tiles share one schedule: at a prune
  step (rpl even) each tile's group rule gives prune_j = round_half_to_even((G − ⌊K/n⌋)/√rpl · (1 − Hn_j²)) of its G
  groups, the image drops p = max_j prune_j from every tile, each keeping max(G − p, f_j) (the best groups, ties to
  the lower group number); rpl = 0 keeps f_j;
- layer F runs on the kept groups' patches; the tower's final norm, then the kept patches go back to their grid
  places (dropped ones zero) through the model's own ``pixel_shuffle``, of which the kept groups' tokens are taken
  (ascending) and projected by its projector: the image's K tokens, tile by tile.

Which tiles form an image: the patched forward counts the prompts' images (each a run of placeholders between
``<img>`` and ``</img>``, which must hold K); ``image_num_patches`` (tiles per image, which the patched processor
adds to its outputs on releases with its per-image hook: 5.25, not 5.0) says how they split the tiles; without it,
T tiles of G images are one tile each (T = G) or one image (G = 1), any other split is refused. All tiles run in one
padded pass (their group counts differ; the padding is hidden from attention by a key mask).

The patch replaces, on the one ``InternVLModel`` instance, ``get_image_features`` (the above), ``get_placeholder_mask``
(a count mismatch names the fix) and ``forward`` (a call with pixels encodes them as above and hands the stock forward
the embeddings; any other call is stock); the outer model's ``forward`` names ``image_num_patches`` (so that
``generate`` takes it), gets its pixels in the prefill (not pre-encoded) and, for beams, expands them prompt by
prompt. The processor, when given, writes K context tokens per image and each video
frame (a frame is an image of one tile; a call mixing videos with ``image_num_patches`` is refused, as its counts
miss the frames).

With ``llm_stage=True`` (off by default; docs/semantics.md, the language-model stage) the tower keeps 2K tokens per
image (split over its tiles as above), and the patched forward prefills the prompts with
:func:`.vlm.stage_prefill`: decoder layer 1 keeps the K best of each image's 2K, in its K placeholders.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, check_int, require
from . import lm_stage, seams
from .attention import capturing
from .encoder import Ragged, check_pixels
from .gemma3 import window_order
from .instance import is_patched, prior_attr, restore_patch, returned, set_attrs
from .policy import LayerView
from .registry import Family, FlowCutConfig
from .schedule import refuse_schedule
from .vit import ViTTower
from .vlm import (check_count, check_processor_class, check_processor_fields, check_stage_call, install, placeholders,
                  stage_prefill)

#: The ops the tower runs.
TOWER_OPS = ("flow_scores_varlen", "topk_select")


@dataclass
class FlowCutInternVLImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched InternVL's ``get_image_features`` returns (G images of ΣT tiles, K = target_num — 2·target_num
    with ``llm_stage`` —, m patches a group).

    last_hidden_state: list of ΣT tensors (1 + f_j·m, C_vision): each tile's last layer (after the tower's final
        norm) on its CLS row and its kept groups' patches, group by group (ascending), members in raster order.
    pooler_output: (G, K, C_text) each image's projected tokens, tile by tile, each tile's in ascending group order.
    keep_indices: (G, K, 2) int64: the (tile of the image, group) of each token; groups number the tile's t² tokens
        in raster order, as the stock model does.
    tokens_per_layer: one list per tile: the rows (CLS included) each run layer 0 … F processed.
    """

    keep_indices: Tensor | None = None
    tokens_per_layer: list[list[int]] | None = None


class InternViT(ViTTower):
    """InternViT seen by FlowCut: a ViT-like tower (a CLS relay row; layers ``encoder.layer``, each with its
    ``attention`` block, run whole: their attention takes no mask, the pruned loop's key mask reaches the attention
    function instead) whose embeddings take no ``interpolate_pos_encoding``."""

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """(T, 3, S, S) → (T, 1 + s², C): the CLS row, then the patches in raster order, position embeddings added."""
        return self.core.embeddings(pixel_values.to(self.dtype))


def classes() -> tuple[type, type]:
    from transformers import InternVLForConditionalGeneration, InternVLModel

    return InternVLForConditionalGeneration, InternVLModel


def internvl_core(model: nn.Module) -> nn.Module:
    """The ``InternVLModel`` of an ``InternVLForConditionalGeneration`` (or the ``InternVLModel`` itself)."""
    return model.model if isinstance(model, classes()[0]) else model


def internvl_tower(core: nn.Module) -> InternViT:
    """The InternViT tower of an ``InternVLModel``, or a FlowCutInputError."""
    from transformers import InternVLVisionModel

    require(
        isinstance(core.vision_tower, InternVLVisionModel),
        f"model's vision tower is a {type(core.vision_tower).__name__}; FlowCut supports InternVL with its InternViT "
        f"tower (InternVLVisionModel)",
    )
    return InternViT(core.vision_tower)


def shuffle_kernel(core: nn.Module, tower: InternViT) -> tuple[int, int]:
    """(s, k): patches per tile side and the pixel-shuffle block side k = 1 / downsample_ratio, or a
    FlowCutInputError where the tile grid does not split into k × k blocks."""
    side = round(tower.num_patches**0.5)
    ratio = core.config.downsample_ratio
    kernel = round(1 / ratio)
    require(kernel >= 1 and kernel * ratio == 1 and side % kernel == 0,
            f"downsample_ratio={ratio} does not split the tower's {side} × {side} patches into whole square blocks: "
            f"FlowCut's InternVL patch prunes whole pixel-shuffle groups (downsample_ratio 1/k with k dividing {side})")
    return side, kernel


def tile_targets(target: int, tiles: int) -> list[int]:
    """The groups each of an image's ``tiles`` keeps for ``target`` tokens: ⌊K/n⌋, plus one for the last K mod n
    tiles (the thumbnail, the last, first)."""
    base, extra = divmod(target, tiles)
    return [base + int(j >= tiles - extra) for j in range(tiles)]


def _offsets(lengths: list[int], device) -> Tensor:
    return torch.tensor([0, *lengths]).cumsum(0).to(device, torch.int32)


def _shared_keep(entropy: Tensor, groups: list[int], finals: list[int], tiles: list[int], base: list[int],
                 steps_left: int) -> list[int] | None:
    """The groups each tile keeps after a prune step (module docstring: one schedule per image), or None where the
    layer does not prune. One host read of Hn for every tile (:func:`.ops.prune_counts`): tile j's prune count, of
    its G_j groups with T − 1 = ⌊K/n⌋, is that of G_j − ⌊K/n⌋ candidates with T = 1."""
    if steps_left % 2:
        return None
    if steps_left == 0:
        return list(finals)
    shares = [share for n, share in zip(tiles, base) for _ in range(n)]
    live = [j for j, (g, f) in enumerate(zip(groups, finals)) if g > f]
    drops = [0] * len(groups)  # what each tile's own rule drops, down to its final count
    if live:
        values = entropy if len(live) == len(groups) else entropy[live]
        counts = ops.prune_counts(values, [groups[j] - shares[j] for j in live], 1, steps_left)
        for j, prune in zip(live, counts):
            drops[j] = min(prune, groups[j] - finals[j])
    keep, start = [], 0
    for n in tiles:  # an image drops the most any of its tiles drops, from every tile
        drop = max(drops[start:start + n])
        keep += [max(g - drop, f) for g, f in zip(groups[start:start + n], finals[start:start + n])]
        start += n
    return keep


def pruned_tiles(tower: InternViT, hidden: Tensor, group: int, tiles: list[int], target: int, backend: str):
    """FlowCut in whole groups (module docstring) on layer 0's input ``hidden`` (T, 1 + G₀·m, C), CLS row first,
    then the patches group by group; ``tiles``: the tiles of each image, in order (ΣT = T).

    Returns the last layer's output as a :class:`.encoder.Ragged` batch (T, 1 + max f_j·m, C) with its layout, each
    tile's kept groups (list of T int64 tensors (f_j,), ascending) and each tile's row count per run layer.
    """
    count, seq, _ = hidden.shape
    layers = tower.layers
    feature = len(layers) - 1
    finals = [f for n in tiles for f in tile_targets(target, n)]
    base = [target // n for n in tiles]
    groups = [(seq - 1) // group] * count
    ragged = Ragged([seq] * count, hidden.device)
    number = torch.arange(groups[0], device=hidden.device).repeat(count)  # packed group numbers
    varlen, select = ops.unchecked("flow_scores_varlen", backend), ops.unchecked("topk_select", backend)
    cum, tokens = None, []
    with capturing(tower.core.config) as run:
        for i, layer in enumerate(layers[:feature]):
            tokens.append(list(ragged.lens))
            scored = groups != finals
            run.watch, run.seen = (tower.attention(layer) if scored else None), None
            run.key_mask = ragged.key_mask(hidden.dtype)
            hidden = tower.run_layer(layer, hidden, run.key_mask)
            if not scored:
                continue
            q, k, v, scale = run.seen
            k, v = (ragged.pack(x.transpose(1, 2)) for x in (k, v))  # (ΣS, H, D)
            view = LayerView(i, feature - i - 1, q, k, v, scale, True, ragged.lens, ragged.cu_seqlens, cum, backend)
            cum, entropy, _ = varlen(view.relay_query(), k, v, ragged.cu_seqlens, cum, float(scale), True, True)
            keep = _shared_keep(entropy, groups, finals, tiles, base, view.steps_left)
            if keep is not None and keep != groups:
                kept = select(cum.view(-1, group).sum(1), _offsets(groups, cum.device), keep, None)[0]  # ascending
                rows = (kept[:, None] * group + torch.arange(group, device=kept.device)).flatten()  # candidates
                tile = torch.tensor([t for t, n in enumerate(keep) for _ in range(n * group)], device=kept.device)
                relays = ragged.cu_seqlens[:-1].long()
                packed = ragged.pack(hidden)[torch.cat((relays, rows + tile + 1)).sort().values]
                cum, number, groups = cum[rows], number[kept], keep
                ragged = Ragged([1 + g * group for g in groups], hidden.device)
                hidden = ragged.unpack(packed)
        tokens.append(list(ragged.lens))
        run.watch, run.key_mask = None, ragged.key_mask(hidden.dtype)
        hidden = tower.run_layer(layers[feature], hidden, run.key_mask)
        run.seen = run.key_mask = None
    return hidden, ragged, list(number.split(groups)), tokens


def _pruned_image_features(self: nn.Module, pixel_values: Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy=None, image_num_patches=None, **kwargs):
    """Patched ``InternVLModel.get_image_features``: tiles (T, 3, S, S), ``image_num_patches`` the tiles of each image
    (None: each tile is an image) → a :class:`FlowCutInternVLImageFeatures` (a tuple with ``return_dict=False``)."""
    return_dict = kwargs.pop("return_dict", None)
    for option in ("output_attentions", "output_hidden_states"):
        require(not kwargs.pop(option, None), f"{option}=True is unavailable on a FlowCut-patched InternVL vision "
                                               f"tower; call flowcut_kernels.remove_flowcut(model) first")
    _check_layer_and_strategy(self, vision_feature_layer, vision_feature_select_strategy)
    tower = internvl_tower(self)
    require(pixel_values is not None, "pixel_values is required: pass the InternVL processor's (T, 3, H, W) tiles")
    if isinstance(pixel_values, Tensor):  # as the stock method does (and the tower's forward, under a device map)
        pixel_values = pixel_values.to(tower.device, tower.dtype)
    check_pixels(pixel_values, tower)
    tiles = [1] * len(pixel_values) if image_num_patches is None else _tile_counts(image_num_patches)
    require(sum(tiles) == len(pixel_values), f"image_num_patches gives {sum(tiles)} tiles, but pixel_values holds "
                                             f"{len(pixel_values)}: pass the processor's outputs together")
    config = self.flowcut_config
    target = config.tower_target
    require(max(tiles) <= target, f"an image of {max(tiles)} tiles cannot keep {target} tokens (target_num="
                                  f"{config.target_num}{', doubled by llm_stage' if config.llm_stage else ''}): each "
                                  f"tile keeps at least one group; use a target_num that keeps >= {max(tiles)}, or "
                                  f"fewer tiles (the image processor's max_patches)")
    backend = ops.resolve_backend(config.backend, tower.device, tower.dtype, TOWER_OPS)
    side, kernel = shuffle_kernel(self, tower)
    group = kernel * kernel
    order = window_order(side, kernel, tower.device)
    hidden = tower.embed(pixel_values)
    hidden = torch.cat((hidden[:, :1], hidden[:, 1:][:, order]), 1)
    last, ragged, kept, tokens = pruned_tiles(tower, hidden, group, tiles, target, backend)
    last = tower.core.layernorm(last)  # the stock tower's final norm (Identity with mean pooling)
    count, channels = len(last), last.shape[-1]
    flat = torch.cat(kept)  # each tile's kept groups, tile by tile
    tile_rows = torch.tensor([t for t, g in enumerate(kept) for _ in range(len(g))])  # built on the host
    tile = tile_rows.to(flat.device)
    members = order[(flat[:, None] * group + torch.arange(group, device=flat.device)).flatten()]
    grid = last.new_zeros(count, side * side, channels)
    grid[tile[:, None].expand(-1, group).flatten(), members] = torch.cat([x[1:n] for x, n in zip(last, ragged.lens)])
    shuffled = self.pixel_shuffle(grid.view(count, side, side, channels), scale_factor=self.config.downsample_ratio)
    shuffled = shuffled.reshape(count, -1, shuffled.shape[-1])  # (T, t², m·C): the stock layout
    projected = self.multi_modal_projector(shuffled[tile, flat]).view(len(tiles), target, -1)
    within = torch.tensor([j for n in tiles for j in range(n)])  # each tile's place in its image
    tile_of = within[tile_rows].to(flat.device)
    out = FlowCutInternVLImageFeatures(
        last_hidden_state=[x[:n] for x, n in zip(last, ragged.lens)],
        pooler_output=projected,
        keep_indices=torch.stack((tile_of, flat), -1).view(len(tiles), target, 2),
        tokens_per_layer=[[t[j] for t in tokens] for j in range(len(last))],
    )
    return returned(self, out, return_dict)


def _tile_counts(image_num_patches) -> list[int]:
    """``image_num_patches`` (a sequence or 1-D tensor of positive ints) as a list."""
    counts = image_num_patches.tolist() if isinstance(image_num_patches, Tensor) else list(image_num_patches)
    require(all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts),
            f"image_num_patches must hold each image's tile count (ints >= 1), got {counts!r}")
    return counts


def _check_layer_and_strategy(core: nn.Module, layer, strategy) -> None:
    """The feature layer must be the last (-1) and the strategy "default" (the CLS row dropped), given or from the
    config."""
    layer = core.config.vision_feature_layer if layer is None else layer
    strategy = core.config.vision_feature_select_strategy if strategy is None else strategy
    require(layer == -1, f"vision_feature_layer={layer!r}: FlowCut's InternVL patch takes the tower's last layer "
                         f"(-1), as InternVL checkpoints do; set config.vision_feature_layer = -1")
    require(strategy == "default", f"vision_feature_select_strategy={strategy!r}: FlowCut's InternVL patch drops the "
                                   f"CLS row ('default'), as InternVL checkpoints do")


def image_runs(marks: Tensor) -> list[int]:
    """The lengths of the runs of consecutive placeholders in ``marks`` (B, L) bool, row by row: one per image."""
    flat = torch.nn.functional.pad(marks, (1, 1)).flatten().int()  # a False column between the rows
    edges = flat.diff()
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return (ends - starts).tolist()


def tiles_per_image(tiles: int, runs: list[int], image_num_patches) -> list[int]:
    """Each image's tiles: ``image_num_patches`` if given, else one each (``tiles`` = images) or all one image."""
    if image_num_patches is not None:
        counts = _tile_counts(image_num_patches)
        require(len(counts) == len(runs) and sum(counts) == tiles,
                f"image_num_patches {counts} does not fit the call's {len(runs)} image(s) and {tiles} tiles: pass "
                f"the processor's outputs together")
        return counts
    if tiles == len(runs) or len(runs) == 1:
        return [1] * tiles if tiles == len(runs) else [tiles]
    raise FlowCutInputError(
        f"the prompts hold {len(runs)} images and pixel_values {tiles} tiles, but not how the tiles split over the "
        f"images: pass image_num_patches (each image's tile count, the image processor's num_patches; the processor "
        f"passed to flowcut() adds it on transformers 5.25), or process the images with crop_to_patches=False"
    )


def _forward(self: nn.Module, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
             inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
             image_num_patches=None, **kwargs):
    """Patched ``InternVLModel.forward``: with pixels, K tokens per image (module docstring) put into the prompts'
    placeholders, then the stock forward on those embeddings (with the language-model stage: the stage's prefill on
    each image's 2K tower tokens); any other call is stock."""
    stock = prior_attr(self, "forward")
    kwargs.pop("image_sizes", None)  # the outer model's, unused by InternVL
    if pixel_values is None:
        return stock(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds, **kwargs)
    require((input_ids is None) != (inputs_embeds is None), "pass exactly one of input_ids and inputs_embeds")
    require(not kwargs.get("mm_encoder_outputs"), "pass pixel_values or mm_encoder_outputs, not both")
    kwargs.pop("mm_encoder_outputs", None)
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    marks = placeholders(self, input_ids, inputs_embeds)
    runs = image_runs(marks)
    target = self.flowcut_config.target_num
    check_count(self, sum(runs), [target] * len(runs))
    require(all(n == target for n in runs), f"the prompts' images hold {runs} placeholder tokens, not target_num="
                                            f"{target} each: pass the processor when patching, flowcut(model, "
                                            f"{target}, processor=processor), and process the prompts again")
    tiles = tiles_per_image(len(pixel_values), runs, image_num_patches)
    if self.flowcut_config.llm_stage:
        cache = seams.pop_cache(kwargs)
        check_stage_call(attention_mask, kwargs)
    encoded = self.get_image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                      image_num_patches=tiles, return_dict=True)
    if self.flowcut_config.llm_stage:
        return stage_prefill(self, inputs_embeds, marks, sum(runs), encoded, attention_mask, position_ids, cache,
                             kwargs)
    features = encoded.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
    inputs_embeds = inputs_embeds.masked_scatter(marks[..., None].to(inputs_embeds.device), features)
    out = stock(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, **kwargs)
    return seams.with_image_outputs(out, encoded)


def _outer_forward(model: nn.Module):
    """The patched ``InternVLForConditionalGeneration.forward`` of ``model``: the stock one, which hands
    ``image_num_patches`` to the patched core; its signature names it (and the stock parameters), so that
    ``generate`` accepts it."""
    stock = prior_attr(model, "forward")

    def forward(*args, image_num_patches=None, **kwargs):
        return stock(*args, image_num_patches=image_num_patches, **kwargs)

    params = list(inspect.signature(stock).parameters.values())
    extra = inspect.Parameter("image_num_patches", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = inspect.Signature(params[:-1] + [extra, params[-1]])  # before **kwargs
    return forward


def _expand_by_prompt(self: nn.Module, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
    """The outer model's ``_expand_inputs_for_generation`` (beams, num_return_sequences): each prompt's tiles (and
    their ``image_num_patches``) are repeated as a group, not tile by tile as the stock expansion does."""
    pixels, counts = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_num_patches", None)
    input_ids, model_kwargs = seams.stock_expand_inputs(self)(
        expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
    )
    if pixels is None:
        return input_ids, model_kwargs
    marks = placeholders(self.model, input_ids, model_kwargs.get("inputs_embeds"))[::expand_size]
    images = [len(image_runs(row[None])) for row in marks]
    tiles = tiles_per_image(len(pixels), image_runs(marks), counts)
    per_image = torch.tensor(tiles).split(images)
    per_prompt = pixels.split([int(t.sum()) for t in per_image])
    model_kwargs["pixel_values"] = torch.cat([p for p in per_prompt for _ in range(expand_size)])
    model_kwargs["image_num_patches"] = torch.cat([t for t in per_image for _ in range(expand_size)])
    return input_ids, model_kwargs


def check_processor(processor, core: nn.Module) -> None:
    """``processor`` must be an ``InternVLProcessor`` for this model (context token, tokens per tile, tile size), not
    patched for another model."""
    from transformers import InternVLProcessor

    check_processor_class(processor, core, InternVLProcessor)
    size = getattr(processor.image_processor, "size", None) or {}
    size = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    pairs = [("image token id", processor.image_token_id, core.config.image_token_id),
             ("tile size", size, tuple(core.config.vision_config.image_size))]
    if not is_patched(processor):  # else this model's own (a re-apply): its count is FlowCut's
        pairs.append(("image_seq_length", processor.image_seq_length, core.config.image_seq_length))
    check_processor_fields(pairs)


def _check_internvl(model: nn.Module, target_num, feature_layer, backend: str, processor, llm_stage) -> int:
    """Validate an InternVL patch before anything changes; returns target_num."""
    core = internvl_core(model)
    tower = internvl_tower(core)
    require(llm_stage in (None, False, True), f"llm_stage must be True, False or None, got {llm_stage!r}")
    require(feature_layer in (None, -1),
            f"feature_layer={feature_layer!r}: InternVL's projector takes the tower's last layer; leave feature_layer "
            f"unset")
    _check_layer_and_strategy(core, None, None)
    side, kernel = shuffle_kernel(core, tower)
    groups = (side // kernel) ** 2
    target_num = check_int("target_num", target_num, 1, groups - 1)
    ops.resolve_backend(backend, tower.device, tower.dtype, TOWER_OPS)
    if llm_stage:
        require(2 * target_num < groups,
                f"target_num={target_num} is too large for llm_stage=True: a one-tile image's tower keeps 2·target_num "
                f"= {2 * target_num} of its {groups} tokens, which must be fewer; use target_num <= "
                f"{(groups - 1) // 2}, or leave llm_stage unset")
        lm_stage.check_decoder(core.language_model, backend)
    if processor is not None:
        check_processor(processor, core)
    return target_num


def patch_internvl(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the InternVL ``model`` (and ``processor``); see the module docstring."""
    refuse_schedule(schedule, "InternVL")
    target_num = _check_internvl(model, target_num, feature_layer, backend, processor, llm_stage)
    core = internvl_core(model)
    install(model, core, FlowCutConfig(target_num, -1, backend, bool(llm_stage)), processor, seams.internvl_count,
            unpatch_internvl, _pruned_image_features, _expand_by_prompt)
    set_attrs(core, forward=_forward.__get__(core, type(core)))
    if model is not core:
        set_attrs(model, **seams.generate_hooks(model, _expand_by_prompt))
        set_attrs(model, forward=_outer_forward(model))


def unpatch_internvl(model: nn.Module) -> None:
    """Undo :func:`patch_internvl`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, internvl_core(model))


FAMILY = Family(
    "internvl",
    classes,
    patch_internvl,
    unpatch_internvl,
    label="InternVLForConditionalGeneration, InternVLModel",
)

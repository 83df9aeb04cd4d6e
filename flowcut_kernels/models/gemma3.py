"""FlowCut for HF Gemma 3 (``Gemma3ForConditionalGeneration`` / ``Gemma3Model``) and its ``Gemma3Processor``.

Gemma 3's SigLIP tower (no CLS row) gives an s × s grid of patches (64 × 64 at 896 px) from its last layer, after the
post-layernorm; the projector average-pools it in k × k windows (4 × 4) into t × t = ``mm_tokens_per_image`` tokens
(256), then normalises and projects them. FlowCut (docs/semantics.md, mean-query variant) prunes in **pooling
windows**, so that every token the language model gets is one stock window's average:

- layer 0's input (the embeddings) is reordered window by window — window (wy, wx) in raster order, its m = k²
  members in raster order — which changes nothing in the tower (no rotary, no mask: attention is order-free);
- the feature layer is the last, F = L − 1; layers 0 … F − 1 are scored (relay = the image's mean query), rpl =
  F − ℓ − 1; a window's score is the sum of its members' S_cum, the entropy Hn the patch-level one;
- a prune step (rpl even) keeps whole windows, each image on its own schedule: G windows, target K,
  prune = round_half_to_even((G − K)/√rpl · (1 − Hn²)), keep max(G − prune, K); rpl = 0 keeps K (Qwen2-VL's rule
  for merge groups, docs/semantics.md);
- layer F runs on the kept windows' patches; the post-layernorm, then the model's own projector on the s × s grid
  with the dropped patches zero, of which the kept windows' tokens are taken, in the stock (raster) order.

All images of a batch run in one padded pass (their windows counts differ between prune steps; the padding is hidden
from attention by a key mask). The patch replaces, on the one ``Gemma3Model`` instance, ``get_image_features``
(the above) and ``get_placeholder_mask`` (a count mismatch names the fix); ``forward`` stays stock, so the
bidirectional attention among an image's tokens covers its K placeholders (``token_type_ids`` 1, as the processor
writes them). The processor, when given, writes K soft tokens per image (each pan-and-scan crop is an image).

The language-model stage is refused: Gemma 3's decoder attends bidirectionally within each image's tokens, sliding
windows in some layers, which the stage's causal long-layout prefill does not reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import check_int, require
from . import seams
from .attention import capturing
from .encoder import Ragged, check_pixels
from .instance import is_patched, restore_patch, returned
from .policy import LayerView, scheduled_keep
from .registry import Family, FlowCutConfig, find_tower, is_tower
from .schedule import refuse_schedule
from .tower import Tower
from .vlm import check_processor_class, check_processor_fields, install

#: The ops the tower runs.
TOWER_OPS = ("flow_scores_varlen", "topk_select")


@dataclass
class FlowCutGemmaImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched Gemma 3's ``get_image_features`` returns (B images, K = target_num, m patches a window).

    last_hidden_state: (B, K·m, C_vision) the tower's last layer on the kept windows' patches, after the
        post-layernorm, window by window (ascending), each window's members in raster order.
    pooler_output: (B, K, C_text) the projected tokens, as the stock method returns them for all windows.
    keep_indices: (B, K) int64 ascending: the kept windows (0 … t² − 1, raster order of the pooled grid).
    tokens_per_layer: one list per image: the patches each run layer 0 … F processed.
    """

    keep_indices: Tensor | None = None
    tokens_per_layer: list[list[int]] | None = None


def classes() -> tuple[type, type]:
    from transformers import Gemma3ForConditionalGeneration, Gemma3Model

    return Gemma3ForConditionalGeneration, Gemma3Model


def gemma_core(model: nn.Module) -> nn.Module:
    """The ``Gemma3Model`` of a ``Gemma3ForConditionalGeneration`` (or the ``Gemma3Model`` itself)."""
    return model.model if isinstance(model, classes()[0]) else model


def gemma_tower(core: nn.Module) -> Tower:
    """The SigLIP tower of a ``Gemma3Model``, or a FlowCutInputError."""
    tower = find_tower(core.vision_tower) if is_tower(core.vision_tower) else None
    require(
        tower is not None and not tower.has_cls,
        f"model's vision tower is a {type(core.vision_tower).__name__}; FlowCut supports Gemma 3 with its SigLIP "
        f"tower (SiglipVisionModel)",
    )
    return tower


def window_order(patches_per_side: int, kernel: int, device=None) -> Tensor:
    """(s²,) int64: the patch numbers (raster over the s × s grid) window by window — the t × t windows of
    kernel × kernel patches in raster order, each window's members in raster order."""
    tokens = patches_per_side // kernel
    window_y, window_x, dy, dx = torch.meshgrid(*(torch.arange(n, device=device) for n in
                                                  (tokens, tokens, kernel, kernel)), indexing="ij")
    return ((window_y * kernel + dy) * patches_per_side + window_x * kernel + dx).flatten()


def _offsets(lengths: list[int], device) -> Tensor:
    return torch.tensor([0, *lengths]).cumsum(0).to(device, torch.int32)


def pruned_tower(tower: Tower, hidden: Tensor, group: int, target: int, backend: str):
    """FlowCut in whole windows (module docstring) on layer 0's input ``hidden`` (B, G₀·m, C), window-major.

    Returns the last layer's output (B, target·m, C) on the kept windows' patches, the kept windows (B, target)
    int64 ascending, and each image's token count per run layer.
    """
    batch, seq, _ = hidden.shape
    layers = tower.layers
    feature = len(layers) - 1
    groups = [seq // group] * batch
    targets = [target] * batch
    ragged = Ragged([seq] * batch, hidden.device)
    number = torch.arange(seq // group, device=hidden.device).repeat(batch)  # packed window numbers
    varlen, select = ops.unchecked("flow_scores_varlen", backend), ops.unchecked("topk_select", backend)
    cum, tokens = None, []
    with capturing(tower.core.config) as run:
        for i, layer in enumerate(layers[:feature]):
            tokens.append(list(ragged.lens))
            scored = groups != targets
            # A pruning layer drops windows before its MLP, which acts on each row alone (as run_pruned does).
            prunes = scored and (feature - i - 1) % 2 == 0
            run.watch, run.seen = (tower.attention(layer) if scored else None), None
            if prunes:
                attended, _ = tower.attention(layer)(hidden_states=layer.layer_norm1(hidden),
                                                     attention_mask=ragged.key_mask(hidden.dtype))
                hidden = hidden + attended
            else:
                hidden = layer(hidden, ragged.key_mask(hidden.dtype))
            if not scored:
                continue
            q, k, v, scale = run.seen
            k, v = (ragged.pack(x.transpose(1, 2)) for x in (k, v))  # (T, H, D)
            view = LayerView(i, feature - i - 1, q, k, v, scale, False, ragged.lens, ragged.cu_seqlens, cum, backend)
            cum, entropy, _ = varlen(view.relay_query(), k, v, ragged.cu_seqlens, cum, float(scale), False, True)
            keep = scheduled_keep(entropy, groups, targets, view.steps_left, relay=0, rule_target=target + 1)
            if keep is not None and keep != groups:
                kept = select(cum.view(-1, group).sum(1), _offsets(groups, cum.device), keep, None)[0]  # ascending
                rows = (kept[:, None] * group + torch.arange(group, device=kept.device)).flatten()
                packed, cum, number, groups = ragged.pack(hidden)[rows], cum[rows], number[kept], keep
                ragged = Ragged([g * group for g in groups], hidden.device)
                hidden = ragged.unpack(packed)
            if prunes:
                hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        run.watch = run.seen = None
    tokens.append(list(ragged.lens))
    hidden = layers[feature](hidden, None)
    return hidden, number.view(batch, target), [[t[b] for t in tokens] for b in range(batch)]


def _pruned_image_features(self: nn.Module, pixel_values: Tensor, **kwargs):
    """Patched ``Gemma3Model.get_image_features``: (B, 3, S, S) pixels → a :class:`FlowCutGemmaImageFeatures` (a
    tuple with ``return_dict=False``), like the stock method."""
    return_dict = kwargs.pop("return_dict", None)
    for option in ("output_attentions", "output_hidden_states"):
        require(not kwargs.pop(option, None), f"{option}=True is unavailable on a FlowCut-patched Gemma 3 vision "
                                               f"tower; call flowcut_kernels.remove_flowcut(model) first")
    require(not kwargs.pop("interpolate_pos_encoding", False),
            "interpolate_pos_encoding is not supported by FlowCut's Gemma 3 patch: pass images at the tower's "
            "resolution (the Gemma3Processor resizes them)")
    tower = gemma_tower(self)
    projector = self.multi_modal_projector
    require(pixel_values is not None, "pixel_values is required: pass (B, 3, H, W) images")
    if isinstance(pixel_values, Tensor):  # as the stock tower's forward would, under a device map
        pixel_values = pixel_values.to(tower.device, tower.dtype)
    check_pixels(pixel_values, tower)
    backend = ops.resolve_backend(self.flowcut_config.backend, tower.device, tower.dtype, TOWER_OPS)
    side, kernel = projector.patches_per_image, projector.kernel_size
    order = window_order(side, kernel, tower.device)
    hidden = tower.embed(pixel_values)[:, order]
    last, windows, tokens = pruned_tower(tower, hidden, kernel * kernel, self.flowcut_config.target_num, backend)
    last = tower.core.post_layernorm(last)
    batch, kept, channels = last.shape
    rows = (windows[:, :, None] * kernel * kernel + torch.arange(kernel * kernel, device=last.device)).flatten(1)
    grid = last.new_zeros(batch, side * side, channels)
    grid[torch.arange(batch, device=last.device)[:, None], order[rows]] = last
    pooled = projector(grid)  # (B, t², C_text): the stock pooling, normalisation and projection
    out = FlowCutGemmaImageFeatures(
        last_hidden_state=last,
        pooler_output=pooled.gather(1, windows[:, :, None].expand(-1, -1, pooled.shape[-1])),
        keep_indices=windows,
        tokens_per_layer=tokens,
    )
    return returned(self, out, return_dict)


def check_processor(processor, core: nn.Module) -> None:
    """``processor`` must be a ``Gemma3Processor`` for this model (soft image token, tokens per image), not patched
    for another model."""
    from transformers import Gemma3Processor

    check_processor_class(processor, core, Gemma3Processor)
    pairs = [("image token id", processor.tokenizer.image_token_id, core.config.image_token_id)]
    if not is_patched(processor):  # else this model's own (a re-apply): its count is FlowCut's
        pairs.append(("image_seq_length", processor.image_seq_length, core.config.mm_tokens_per_image))
    check_processor_fields(pairs)


def _check_gemma3(model: nn.Module, target_num, feature_layer, backend: str, processor, llm_stage) -> int:
    """Validate a Gemma 3 patch before anything changes; returns target_num."""
    core = gemma_core(model)
    tower = gemma_tower(core)
    require(llm_stage in (None, False),
            f"llm_stage={llm_stage!r}: the language-model stage is not available for Gemma 3 (its decoder attends "
            f"bidirectionally among an image's tokens, which the stage's prefill does not reproduce); leave "
            f"llm_stage unset or False")
    require(feature_layer in (None, -1),
            f"feature_layer={feature_layer!r}: Gemma 3's projector takes the tower's last layer; leave feature_layer "
            f"unset")
    windows = core.config.mm_tokens_per_image
    target_num = check_int("target_num", target_num, 1, windows - 1)
    ops.resolve_backend(backend, tower.device, tower.dtype, TOWER_OPS)
    if processor is not None:
        check_processor(processor, core)
    return target_num


def patch_gemma3(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the Gemma 3 ``model`` (and ``processor``); see the module docstring."""
    refuse_schedule(schedule, "Gemma 3")
    target_num = _check_gemma3(model, target_num, feature_layer, backend, processor, llm_stage)
    config = FlowCutConfig(target_num, -1, backend)
    install(model, gemma_core(model), config, processor, seams.gemma3_count, unpatch_gemma3, _pruned_image_features,
            None)


def unpatch_gemma3(model: nn.Module) -> None:
    """Undo :func:`patch_gemma3`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, gemma_core(model))


FAMILY = Family(
    "gemma3",
    classes,
    patch_gemma3,
    unpatch_gemma3,
    label="Gemma3ForConditionalGeneration, Gemma3Model",
)

"""Every seam between FlowCut's patches and transformers' internals, one small function each.

Family modules call these and never name a private transformers attribute or check a release: what changed
between releases is decided here, by looking at what the installed release has (a field, a parameter, a method),
and each function says which releases it covers. Tested: transformers :data:`OLDEST` … :data:`NEWEST`; the package
declares ``>= OLDEST, < NEXT`` (the next minor after the newest tested).

Outside that range :func:`check_release` warns once; a seam the installed release lacks raises
:class:`~flowcut_kernels.FlowCutInputError` naming the release and the tested range (:func:`require`), before a
patch changes anything.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from contextlib import contextmanager

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

from ..checks import FlowCutInputError

__all__ = ["BaseModelOutputWithPooling", "CLIPVisionModelOutput"]  # base classes of FlowCut's outputs

#: The oldest and newest transformers releases the test suite runs on (CI pins both).
OLDEST, NEWEST = "5.0.0", "5.25.0"
#: The first release past the declared range: the minor after :data:`NEWEST`.
NEXT = "5.26"
#: The installed release.
RELEASE = transformers.__version__

_warned = False


def tested_range() -> str:
    return f"transformers {OLDEST} to {NEWEST} (pip install 'transformers>={OLDEST},<{NEXT}')"


def check_release() -> None:
    """Warn once when the installed transformers is outside the tested range (a newer release may move a seam)."""
    global _warned
    if _warned or Version(OLDEST) <= Version(RELEASE) < Version(NEXT):
        return
    _warned = True
    warnings.warn(
        f"flowcut_kernels is tested with {tested_range()}; transformers {RELEASE} is installed. A patch whose "
        f"seam moved in this release raises FlowCutInputError; install a tested release if results look wrong",
        stacklevel=3,
    )


def require(present: bool, what: str) -> None:
    """Refuse a patch whose seam ``what`` the installed release lacks, naming it and the tested releases."""
    if not present:
        raise FlowCutInputError(
            f"transformers {RELEASE} has no {what}, which this FlowCut patch needs; FlowCut is tested with "
            f"{tested_range()}; install one of those (the model is unchanged)"
        )


# -- The cache keyword: ``past_key_values`` in 5.0–5.23, ``cache`` from 5.24 (forwards, layers, outputs). --------

#: The keyword (and output field) under which forwards and decoder layers take and return the KV cache.
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_arg(cache) -> dict:
    """``{keyword: cache}`` to pass a cache to a stock forward or decoder layer of the installed release."""
    return {CACHE: cache}


def pop_cache(kwargs: dict):
    """Take a patched forward's cache argument out of ``kwargs`` under either name (None if absent)."""
    cache = kwargs.pop("past_key_values", None)
    return kwargs.pop("cache", None) if cache is None else cache


def output_cache(output):
    """The cache an output carries (``past_key_values`` or ``cache``)."""
    return getattr(output, CACHE)


def new_cache(config):
    """An empty dynamic cache for a text model's ``config`` (every 5.x)."""
    return DynamicCache(config=config)


def causal_mask(config, embeds: Tensor, mask: Tensor | None, positions: Tensor | None):
    """The stock causal mask of a prefill without cache, for ``config``'s attention implementation. 5.0 names the
    embeddings ``input_embeds`` and takes a ``cache_position``; later releases do neither; the cache parameter is
    ``past_key_values`` or ``cache`` as :data:`CACHE`."""
    params = inspect.signature(create_causal_mask).parameters
    kwargs = {"inputs_embeds" if "inputs_embeds" in params else "input_embeds": embeds}
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    return create_causal_mask(config=config, attention_mask=mask, position_ids=positions, **kwargs)


def layer_hidden(output) -> Tensor:
    """A decoder layer's hidden states (Qwen2-VL's layers return a tuple in 5.0, a tensor later)."""
    return output[0] if isinstance(output, tuple) else output


# -- Outputs: built from the text model's output, with the fields the installed release's classes have. -----------


def text_output(hidden: Tensor, cache, states) -> BaseModelOutputWithPast:
    """A text model's output (every 5.x)."""
    return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=states, **cache_arg(cache))


def _core_output_class(core: nn.Module) -> type:
    """The class a VLM core's stock forward returns: the model module's ``<Core>OutputWithPast`` where it has one
    (LLaVA, LLaVA-NeXT: every 5.x; Qwen2-VL/2.5-VL, Qwen3-VL(-MoE): 5.0), or its ``<Prefix>BaseModelOutputWithPast``
    for a core ``<Prefix>Model`` (Qwen3-VL-MoE 5.24+, with the router logits), else
    ``MultimodalBaseModelOutputWithPast`` (5.24+), else the text model's ``BaseModelOutputWithPast`` (Qwen
    5.1–5.23)."""
    module = inspect.getmodule(type(core))
    name = type(core).__name__
    own = getattr(module, name + "OutputWithPast", None) or getattr(
        module, name.removesuffix("Model") + "BaseModelOutputWithPast", None
    )
    if own is not None:
        return own
    return getattr(transformers.modeling_outputs, "MultimodalBaseModelOutputWithPast", BaseModelOutputWithPast)


def vlm_output(core: nn.Module, text: BaseModelOutputWithPast, image_outputs: BaseModelOutputWithPooling, **extra):
    """What ``core``'s stock forward returns for a prefill the patch ran itself: ``text`` (the text model's
    output) with the images' encoder output where the class has a place for it — ``image_outputs`` (5.24+) or
    ``image_hidden_states``, the concatenated projected features (≤ 5.23) — and the ``extra`` fields it has
    (Qwen 5.0: ``rope_deltas``)."""
    cls = _core_output_class(core)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {name: value for name, value in text.items() if name in fields}
    if "image_outputs" in fields:
        values["image_outputs"] = image_outputs
    elif "image_hidden_states" in fields and image_outputs is not None:
        values["image_hidden_states"] = torch.cat(list(image_outputs.pooler_output))
    values.update({name: value for name, value in extra.items() if name in fields})
    return cls(**values)


def with_image_outputs(output, image_outputs, video_outputs=None):
    """The stock forward's own ``output``, given the images' (and videos') encoder output where its class has the
    field (5.24+), for a forward that encoded them before calling the stock one."""
    fields = getattr(output, "__dataclass_fields__", {})
    if "image_outputs" in fields:
        output.image_outputs = image_outputs
    if "video_outputs" in fields:
        output.video_outputs = video_outputs
    return output


def with_video_outputs(output, video_outputs):
    """``output`` of a LLaVA-OneVision core's forward, given the videos' encoder output (its ``pooler_output``: (V, T,
    C_text)) where the class has a place for it: ``video_outputs`` (5.24+) or ``video_hidden_states``, the features
    (V·T, C_text) (≤ 5.23), for a forward that put the videos into the embeddings before calling the stock one."""
    fields = getattr(output, "__dataclass_fields__", {})
    if "video_outputs" in fields:
        output.video_outputs = video_outputs
    elif "video_hidden_states" in fields:
        output.video_hidden_states = video_outputs.pooler_output.flatten(0, 1)
    return output


def image_features(output) -> Tensor:
    """(ΣW_g, C_text): the projected image features a VLM core's output carries, concatenated image by image
    (``image_outputs.pooler_output`` in 5.24+, one tensor per image; ``image_hidden_states`` in ≤ 5.23)."""
    if "image_outputs" in getattr(output, "__dataclass_fields__", {}):
        return torch.cat(list(output.image_outputs.pooler_output))
    return output.image_hidden_states


# -- The attention interface (every 5.x). ----------------------------------------------------------------------


try:  # looked up once here: an import inside a compiled region is a graph break
    from transformers.utils.output_capturing import _active_collector as _ACTIVE_COLLECTOR
except ImportError:  # 5.0.0
    _ACTIVE_COLLECTOR = None


@contextmanager
def stock_capture_off():
    """While the pruned loop runs a model's layers itself: the stock forwards' output-capturing hooks record nothing.

    Newer releases (``transformers.utils.output_capturing``; 5.25) install persistent forward hooks on a model's
    layers at its first stock forward; they read the active collector from a compile-aware variable. Set to None
    here, they stay quiet — so the pruned layers neither land in an enclosing stock forward's ``hidden_states`` nor
    make ``torch.compile(fullgraph=True)`` trace a ``ContextVar.get``. 5.0.0 patches layers per stock call instead
    (no persistent hooks): nothing to do.
    """
    if _ACTIVE_COLLECTOR is None:
        yield
        return
    token = _ACTIVE_COLLECTOR.set(None)
    try:
        yield
    finally:
        _ACTIVE_COLLECTOR.reset(token)


def register_attention(name: str, function) -> None:
    AttentionInterface.register(name, function)


def attention_function(module: nn.Module, implementation: str):
    """The attention function ``module`` uses under ``implementation``: a registered one, or its module's eager."""
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    return inspect.getmodule(type(module)).eager_attention_forward


def attention_implementation(config) -> str | None:
    """The implementation ``config`` (one instance's) selects, as set (None: the release's default)."""
    return config._attn_implementation_internal


def select_attention(config, implementation: str | None) -> None:
    """Select ``implementation`` on ``config`` (one instance's; its layers read it at each call)."""
    config._attn_implementation_internal = implementation


# -- generate (5.x after 5.0 pre-encodes images; 5.0 never does). ----------------------------------------------


def generate_hooks(model: nn.Module, expand_by_prompt) -> dict:
    """Attributes for :func:`~.instance.set_attrs` on an outer VLM that must get its pixels in the prefill (not
    pre-encoded: ``_supports_mm_encoder_outputs`` false) and expand them by prompt for beams (``expand_by_prompt``
    as its ``_expand_inputs_for_generation``)."""
    return {
        "_supports_mm_encoder_outputs": lambda: False,
        "_expand_inputs_for_generation": expand_by_prompt.__get__(model, type(model)),
    }


def stock_expand_inputs(model: nn.Module):
    """The class's ``_expand_inputs_for_generation`` bound to ``model`` (what :func:`generate_hooks` replaced)."""
    return inspect.getattr_static(type(model), "_expand_inputs_for_generation").__get__(model, type(model))


# -- Processors: how each family's processor counts image tokens. ---------------------------------------------


def llava_count(processor, count: int) -> dict:
    """Attributes that make a ``LlavaProcessor`` expand each ``<image>`` to ``count`` tokens for any size (every 5.x
    counts ``(h // patch_size) · (w // patch_size) + num_additional_image_tokens``, − 1 with the "default"
    strategy): ``patch_size`` above any image side, the count in ``num_additional_image_tokens``."""
    require(
        hasattr(processor, "patch_size") and hasattr(processor, "num_additional_image_tokens"),
        "LlavaProcessor.patch_size / num_additional_image_tokens (how LLaVA's processor counts image tokens)",
    )
    default = processor.vision_feature_select_strategy == "default"
    return {"patch_size": sys.maxsize, "num_additional_image_tokens": count + int(default)}


def next_count(processor, count: int) -> dict:
    """Attributes that make a ``LlavaNextProcessor`` give ``count`` tokens per image (its
    ``_get_number_of_features``, + 1 for the "default" strategy's CLS drop; every 5.x)."""
    require(
        hasattr(type(processor), "_get_number_of_features"),
        "LlavaNextProcessor._get_number_of_features (how LLaVA-NeXT's processor counts image tokens)",
    )
    default = processor.vision_feature_select_strategy == "default"
    return {"_get_number_of_features": lambda *sizes: count + int(default)}


def onevision_count(processor, count: int) -> dict:
    """Attributes that make a ``LlavaOnevisionProcessor`` give ``count`` tokens per image (every 5.x: an image alone
    in its prompt counts ``_get_number_of_features(...)``, one of a multi-image prompt ``num_image_tokens + 1``, each
    − 1 with the "default" strategy). ``num_image_tokens`` also sizes 5.0's video count (:func:`onevision_video_count`
    replaces it from 5.1)."""
    require(
        hasattr(type(processor), "_get_number_of_features") and hasattr(processor, "num_image_tokens"),
        "LlavaOnevisionProcessor._get_number_of_features / num_image_tokens (how OneVision's processor counts image "
        "tokens)",
    )
    default = processor.vision_feature_select_strategy == "default"
    return {
        "_get_number_of_features": lambda *sizes: count + int(default),
        "num_image_tokens": count - 1 + int(default),
    }


def onevision_video_count(processor, count: int) -> dict:
    """Attributes that make a ``LlavaOnevisionProcessor`` write ``count`` placeholders per video: its
    ``replace_video_token`` hook (5.1+). 5.0 counts videos inside ``__call__`` (frames · pooled tokens + 1): nothing
    to set there, the patched model refuses that count, naming it."""
    if not hasattr(type(processor), "replace_video_token"):
        return {}
    return {"replace_video_token": lambda *args, **kwargs: processor.video_token * count}


def qwen_counts(processor, image_token, video_token) -> dict:
    """Attributes that make a Qwen-VL processor write ``image_token(processor, image_inputs, index)`` per image and
    ``video_token(processor, video_inputs, index)`` per video (its ``replace_image_token`` / ``replace_video_token``
    hooks, 5.1+; 5.0 counts inside ``__call__``)."""
    require(
        hasattr(type(processor), "replace_image_token"),
        f"{type(processor).__name__}.replace_image_token (the per-image token hook of Qwen processors, 5.1+)",
    )
    return {
        "replace_image_token": image_token.__get__(processor, type(processor)),
        "replace_video_token": video_token.__get__(processor, type(processor)),
    }


def qwen_stock_video_text(processor, video_inputs: dict, index: int, **kwargs) -> str:
    """The text the processor's class writes for video ``index`` (its ``replace_video_token``, 5.1+): Qwen2-VL's
    and Qwen2.5-VL's one run of placeholders, Qwen3-VL's per frame its timestamp and its run between vision
    start and end tokens."""
    return type(processor).replace_video_token(processor, video_inputs, index, **kwargs)


def gemma3_count(processor, count: int) -> dict:
    """Attributes that make a ``Gemma3Processor`` write ``count`` soft tokens per image: every 5.x expands each image
    to its ``full_image_sequence`` (built once from ``image_seq_length`` in ``__init__``: blank lines, the
    begin-of-image token, the soft tokens, the end-of-image token, blank lines) and counts by ``image_seq_length``."""
    require(
        hasattr(processor, "full_image_sequence") and hasattr(processor, "image_seq_length"),
        "Gemma3Processor.full_image_sequence / image_seq_length (how Gemma 3's processor writes image tokens)",
    )
    tokenizer = processor.tokenizer
    soft = tokenizer.image_token * count
    return {
        "image_seq_length": count,
        "full_image_sequence": f"\n\n{tokenizer.boi_token}{soft}{tokenizer.eoi_token}\n\n",
    }


# -- LLaVA-NeXT's anyres helpers (every 5.x). -------------------------------------------------------------------


def anyres():
    """LLaVA-NeXT's anyres helpers: (grid_shape(image_size, pinpoints, side) → (gh, gw), crop_count(image_size,
    pinpoints, side) → crops incl. the base one, unpad(tensor (C, H, W), image_size) → the unpadded region)."""
    from transformers.models.llava_next import modeling_llava_next as m

    return m.get_anyres_image_grid_shape, m.image_size_to_num_patches, m.unpad_image


# -- Qwen2-VL/2.5-VL vision tower and M-RoPE. --------------------------------------------------------------------


def qwen_rotary(visual: nn.Module, grid: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The tower's rotary (cos, sin), (P, D) each, for the patches of ``grid`` in the tower's order (5.0: the
    tower's ``rot_pos_emb``; later: ``vision_utils.get_vision_position_ids``)."""
    if hasattr(visual, "rot_pos_emb"):
        emb = visual.rot_pos_emb(grid)
        emb = torch.cat((emb, emb), dim=-1)
        return emb.cos(), emb.sin()
    from transformers.vision_utils import get_vision_position_ids

    return visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, visual.spatial_merge_size))


def qwen_window_index(visual: nn.Module, grid: Tensor) -> tuple[Tensor, list[int]]:
    """Qwen2.5-VL's window reorder of the merge groups and its window boundaries (5.0: the tower's
    ``get_window_index``; later: ``vision_utils.get_vision_window_index``)."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid)
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)


def rope_deltas_from_real_tokens(core: nn.Module) -> bool:
    """Whether the release's ``rope_deltas`` count the real tokens (5.1+: its ``get_rope_index`` takes
    ``mm_token_type_ids``) rather than the padded length (5.0)."""
    return "mm_token_type_ids" in inspect.signature(type(core).get_rope_index).parameters


def qwen_stock_positions(get_rope_index, config, input_ids: Tensor, mask: Tensor, image_grid: Tensor | None,
                         video_grid: Tensor | None, second_per_grid_ts=None) -> Tensor:
    """(3, B, L) the stock M-RoPE positions of unpruned prompts (input_ids, mask (B, L)), from the model's own
    ``get_rope_index`` (its class's, passed in): 5.0 takes no ``mm_token_type_ids``, later releases need them (1 at
    image, 2 at video placeholders, 0 elsewhere, as the processors write them); Qwen2.5-VL takes
    ``second_per_grid_ts``."""
    parameters = inspect.signature(get_rope_index).parameters
    kwargs = dict(input_ids=input_ids, image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask)
    if "mm_token_type_ids" in parameters:
        kwargs["mm_token_type_ids"] = ((input_ids == config.image_token_id).int()
                                       + 2 * (input_ids == config.video_token_id).int())
    if "second_per_grid_ts" in parameters:
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    return get_rope_index(**kwargs)[0]


def qwen_position_embedding(visual: nn.Module, grid: Tensor) -> Tensor:
    """Qwen3-VL's learned position embedding, (P, C), resampled to each image's grid, for the patches of ``grid`` in
    the tower's order (5.0: the tower's ``fast_pos_embed_interpolate``; later:
    ``vision_utils.get_vision_interpolation_indices_and_weights`` on its ``pos_embed`` table)."""
    if hasattr(visual, "fast_pos_embed_interpolate"):
        return visual.fast_pos_embed_interpolate(grid)
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size,
    )
    return (visual.pos_embed(indices) * weights[:, :, None]).sum(1)


def qwen3_5_classes() -> tuple[type, ...]:
    """``(Qwen3_5ForConditionalGeneration, Qwen3_5Model)`` where the release has Qwen3.5 (5.2x; not 5.0), else ``()``:
    no model of the release is one."""
    names = ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model")
    return tuple(getattr(transformers, n) for n in names) if all(hasattr(transformers, n) for n in names) else ()


# -- ViT / DINOv2 towers: where the layers sit, which block calls the attention, how a layer is called. ----------


def vit_layers(core: nn.Module) -> nn.ModuleList:
    """A ViT or DINOv2 model's layers: ``layers`` on the model itself (ViT in 5.25), else ``encoder.layer`` (ViT in
    5.0; DINOv2 and DINOv2 with registers in every 5.x)."""
    return core.layers if hasattr(core, "layers") else core.encoder.layer


def vit_attention(layer: nn.Module) -> nn.Module:
    """The block of a ViT/DINOv2 layer that calls the attention interface: ``layer.attention`` (5.25: q/k/v
    projections and the output projection in one module), or its inner self-attention
    ``layer.attention.attention`` (5.0: ``query``/``key``/``value``, the output projection beside it)."""
    inner = getattr(layer.attention, "attention", None)
    return inner if isinstance(inner, nn.Module) else layer.attention


def run_vit_layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None, **kwargs) -> Tensor:
    """Call a ViT/DINOv2 layer: ``layer(hidden, mask, **kwargs)`` where it takes an ``attention_mask`` (5.25), else
    ``layer(hidden)`` (5.0: its attention gets no mask; the pruned loop hands the mask to the ``"flowcut"``
    attention function instead, :class:`~.attention.Capture`.key_mask)."""
    if "attention_mask" in inspect.signature(type(layer).forward).parameters:
        return layer(hidden, mask, **kwargs)
    return layer(hidden)


# -- InternVL's processor: how it writes image tokens and reports each image's tiles. ---------------------------


def internvl_count(processor, count: int) -> dict:
    """Attributes that make an ``InternVLProcessor`` write ``count`` context tokens per image, whatever its tiles, and
    per video frame (its ``image_seq_length`` per frame), and, where the release lets it, add ``image_num_patches``
    (each image's tiles) to its outputs. Releases with the ``replace_image_token`` hook (5.25 tested): that hook per
    image, and ``_process_images`` (the image processor's outputs, of which ``num_patches`` is copied); 5.0 counts
    ``image_seq_length`` times each image's tiles inside ``_insert_media_placeholders``, which is given one tile per
    image (its slicing of the pixels uses the separate cumulative counts) and reports no tiles."""
    cls = type(processor)
    attrs = {"image_seq_length": count}
    if hasattr(cls, "replace_image_token") and hasattr(cls, "_process_images"):
        stock = inspect.getattr_static(cls, "_process_images").__get__(processor, cls)

        def replace_image_token(image_inputs, image_idx, **kwargs):
            return f"{processor.start_image_token}{processor.image_token * count}{processor.end_image_token}"

        def process_images(images, **kwargs):
            processed, replacements = stock(images, **kwargs)
            patches = processed["num_patches"]
            processed["image_num_patches"] = patches.tolist() if hasattr(patches, "tolist") else list(patches)
            return processed, replacements

        attrs.update(replace_image_token=replace_image_token, _process_images=process_images)
        return attrs
    require(hasattr(cls, "_insert_media_placeholders"),
            "InternVLProcessor.replace_image_token or _insert_media_placeholders (how InternVL's processor writes "
            "image tokens)")
    insert = inspect.getattr_static(cls, "_insert_media_placeholders").__get__(processor, cls)

    def insert_media_placeholders(text, image_pixel_values, video_pixel_values, image_num_patches, *rest):
        return insert(text, image_pixel_values, video_pixel_values, [1] * len(image_num_patches), *rest)

    attrs["_insert_media_placeholders"] = insert_media_placeholders
    return attrs

"""The pieces every VLM family's patch shares: placeholders and their count, the LLaVA-like tower checks and the
checks a LLaVA-like patch ends with, the feature layer a call asks for, processor ownership, the language-model
stage's forward for LLaVA-like cores, prompt-grouped beam expansion, and the install of a LLaVA-like patch (with its
processor's re-apply) on its instances.

A family module (``llava.py``, ``llava_next.py``, ``qwen2_vl.py``) holds what is its own — its image features, its
layout, its processor's checks — and takes the rest from here.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, require
from . import lm_stage, seams
from .encoder import PACKED_OPS, feature_index
from .instance import is_patched, prior_attr, returned, set_attrs
from .registry import find_tower, is_tower, supported_towers
from .tower import Tower


def llava_tower(core: nn.Module) -> Tower:
    """The vision tower of a LLaVA-like core (``LlavaModel``, ``LlavaNextModel``), or a FlowCutInputError naming the
    supported towers."""
    if not is_tower(core.vision_tower, in_llava=True):
        raise FlowCutInputError(
            f"model's vision tower is a {type(core.vision_tower).__name__}, which FlowCut does not support; "
            f"a LLaVA model is supported with one of {supported_towers(in_llava=True)} as its vision tower"
        )
    return find_tower(core.vision_tower)


def feature_layer_of(vision_feature_layer, num_layers: int, argument: str = "vision_feature_layer") -> int:
    """LLaVA's ``vision_feature_layer`` (an index into the tower's L + 1 hidden states) as a negative layer.

    ``hidden_states[k]`` is the output of layer k − 1, so k ≥ 1 is the feature layer k − (L + 1) of docs/semantics.md;
    negative k is already that. A list (several layers concatenated) is refused.
    """
    require(
        not isinstance(vision_feature_layer, (list, tuple)),
        f"{argument}={vision_feature_layer!r} selects several feature layers, which FlowCut does not support: "
        f"pruning keeps different tokens at each layer, so their features cannot be concatenated; use a model "
        f"whose {argument} is a single int (LLaVA-1.5: -2)",
    )
    is_int = isinstance(vision_feature_layer, int) and not isinstance(vision_feature_layer, bool)
    if is_int and vision_feature_layer >= 0:
        vision_feature_layer -= num_layers + 1
    return feature_index(vision_feature_layer, num_layers, argument) - num_layers


def check_strategy(strategy, tower: Tower, argument: str = "vision_feature_select_strategy") -> None:
    """CLIP towers: "default" only (the features exclude the CLS row); SigLIP: "default" or "full" (no CLS)."""
    allowed = ("default",) if tower.has_cls else ("default", "full")
    require(
        strategy in allowed,
        f"{argument}={strategy!r} is not supported with a {type(tower.core).__name__} tower: "
        + (
            "FlowCut's features are the kept patches without the CLS row (docs/semantics.md), as with 'default'; "
            "set the model's config.vision_feature_select_strategy = 'default'"
            if tower.has_cls
            else "use 'default' or 'full' (a SigLIP tower has no CLS row, so both give all kept tokens)"
        ),
    )


def requested_layer(core: nn.Module, tower: Tower, vision_feature_layer, vision_feature_select_strategy) -> int:
    """The feature layer (negative) a ``get_image_features`` call asks for, its arguments defaulting to the core's
    config; the strategy must suit the tower (:func:`check_strategy`)."""
    if vision_feature_layer is None:
        vision_feature_layer = core.config.vision_feature_layer
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = core.config.vision_feature_select_strategy
    feature_layer = feature_layer_of(vision_feature_layer, len(tower.layers))
    check_strategy(vision_feature_select_strategy, tower)
    return feature_layer


def check_processor_owner(processor, core: nn.Module) -> None:
    """``processor`` is not patched by flowcut() for another model (this ``core``'s own is fine: a re-apply)."""
    owner = vars(core).get("_flowcut_processor")
    require(
        not is_patched(processor) or owner is processor,
        "processor is already patched by flowcut() for another model; call remove_flowcut() on that model first, "
        "or pass a separate processor instance (e.g. copy.deepcopy(processor))",
    )


def check_processor_class(processor, core: nn.Module, processor_class: type) -> None:
    """``processor`` must be a ``processor_class``, not patched for another model (:func:`check_processor_owner`)."""
    require(
        isinstance(processor, processor_class),
        f"processor is a {type(processor).__name__}; pass the model's {processor_class.__name__} (e.g. "
        f"AutoProcessor.from_pretrained of the same checkpoint), whose image-token count FlowCut adjusts",
    )
    check_processor_owner(processor, core)


def check_processor_fields(pairs) -> None:
    """A processor must match its model: ``pairs`` holds (what, the processor's value, the model's) for each thing
    they must share."""
    mismatches = [f"{name} {theirs!r} (the model's {ours!r})" for name, theirs, ours in pairs if theirs != ours]
    require(not mismatches, f"processor does not match the model: its {', '.join(mismatches)}; pass the processor "
                            f"of the model's checkpoint")


def check_feature_layer(core: nn.Module, tower: Tower, feature_layer, family: str) -> int:
    """A LLaVA-like core's feature layer (negative) from its config; ``feature_layer``, if given, must be it."""
    num_layers = len(tower.layers)
    configured = feature_layer_of(core.config.vision_feature_layer, num_layers, "model.config.vision_feature_layer")
    if feature_layer is not None:
        require(
            feature_index(feature_layer, num_layers) - num_layers == configured,
            f"feature_layer={feature_layer} differs from the model's config.vision_feature_layer "
            f"({core.config.vision_feature_layer}), whose features its projector was trained on; leave feature_layer "
            f"unset for a {family} model",
        )
    check_strategy(core.config.vision_feature_select_strategy, tower, "model.config.vision_feature_select_strategy")
    return configured


def check_rest(core: nn.Module, tower: Tower, target_num: int, backend: str, llm_stage: bool, processor,
               check_processor, keeps: str | None = None, off: str = "") -> None:
    """The checks a LLaVA-like patch ends with, in this order: ``backend`` for the tower's device and dtype; with
    ``llm_stage``, that 2·target_num is fewer than the tower's N₀ patches where a crop keeps that many (``keeps``:
    which, in the message's words; None: none does; ``off``: how to do without the stage), then the decoder; a given
    ``processor``, by the family's ``check_processor(processor, core)``."""
    ops.resolve_backend(backend, tower.device, tower.dtype, PACKED_OPS)
    if llm_stage:
        if keeps is not None:
            require(
                2 * target_num < tower.num_patches,
                f"target_num={target_num} is too large for llm_stage=True: {keeps} keeps 2·target_num = "
                f"{2 * target_num} of its {tower.num_patches} patches, which must be fewer; use target_num <= "
                f"{(tower.num_patches - 1) // 2}, or {off}",
            )
        lm_stage.check_decoder(core.language_model, backend)
    if processor is not None:
        check_processor(processor, core)


def placeholders(core: nn.Module, input_ids, inputs_embeds) -> Tensor:
    """(B, L) bool: the prompts' image placeholders, from ``input_ids`` or, without them, from the embeddings."""
    token_id = core.config.image_token_id
    if input_ids is not None:
        return input_ids == token_id
    embedded = core.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
    return (inputs_embeds == embedded).all(-1)


def check_count(core: nn.Module, n_tokens: int, counts: list[int], kind: str = "image") -> None:
    """The prompts must hold ``counts[g]`` placeholders for image (or video, ``kind``) g; else the fix is to pass the
    processor."""
    target = core.flowcut_config.target_num
    if n_tokens != sum(counts):
        raise FlowCutInputError(
            f"the prompts hold {n_tokens} {kind} placeholder tokens, but FlowCut gives the language model "
            f"{sum(counts)} for {len(counts)} {kind}(s) ({target} per {kind}, or fewer for one with fewer): the "
            f"processor still writes the unpruned count; pass it when patching, flowcut(model, {target}, "
            f"processor=processor), and process the prompts again (or write that many {kind} tokens per {kind})"
        )


def _checked_placeholder_mask(self: nn.Module, input_ids, inputs_embeds, image_features):
    """Patched ``LlavaModel.get_placeholder_mask``: a mismatch names the fix (pass the processor), then stock."""
    images = image_features.numel() // inputs_embeds.shape[-1] // self.flowcut_config.target_num
    marks = placeholders(self, input_ids, inputs_embeds)
    check_count(self, int(marks.sum()), [self.flowcut_config.target_num] * images)
    stock = prior_attr(self, "get_placeholder_mask")
    return stock(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)


def staged_forward(
    self: nn.Module,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    position_ids=None,
    inputs_embeds=None,
    vision_feature_layer=None,
    vision_feature_select_strategy=None,
    image_sizes=None,
    mm_encoder_outputs=None,
    **kwargs,
):
    """The patched forward, with the language-model stage, of a LLaVA-like core (``LlavaModel``, ``LlavaNextModel``):
    prompts with images are prefilled by :func:`.lm_stage.prefill` on each image's tower-stage features (W_g ≥
    target_num rows) and the output is the stock forward's class (:func:`.seams.vlm_output`); any other call is the
    stock forward."""
    cache = seams.pop_cache(kwargs)
    encoded = (mm_encoder_outputs or {}).get("image")
    if pixel_values is None and encoded is None:
        if mm_encoder_outputs is not None:  # transformers > 5.0 only
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs
        return prior_attr(self, "forward")(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, **seams.cache_arg(cache), **kwargs,
        )
    require(pixel_values is None or encoded is None, "pass pixel_values or mm_encoder_outputs, not both")
    require((input_ids is None) != (inputs_embeds is None), "pass exactly one of input_ids and inputs_embeds")
    check_stage_call(attention_mask, kwargs)
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    marks = placeholders(self, input_ids, inputs_embeds)
    count = int(marks.sum())
    if encoded is None:
        images = len(image_sizes) if image_sizes is not None else len(pixel_values)
        check_count(self, count, [self.flowcut_config.target_num] * images)
        encoded = self.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
            return_dict=True,
        )
    return stage_prefill(self, inputs_embeds, marks, count, encoded, attention_mask, position_ids, cache, kwargs)


def check_stage_call(attention_mask, kwargs: dict) -> None:
    """A prefill call the language-model stage can run: no ``output_attentions`` (popped from ``kwargs``), prompts
    padded on the left."""
    require(
        not kwargs.pop("output_attentions", None),
        "output_attentions=True is unavailable with llm_stage: the stage's prefill never builds the attention "
        "matrix; call flowcut_kernels.remove_flowcut(model) first",
    )
    require(
        attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask[:, -1].all())),
        "llm_stage takes a (B, L) attention_mask of prompts padded on the left (the last token is each prompt's "
        "relay): set tokenizer.padding_side = 'left'",
    )


def stage_prefill(self: nn.Module, inputs_embeds: Tensor, marks: Tensor, count: int, encoded, attention_mask,
                  position_ids, cache, kwargs: dict):
    """The language-model stage's prefill (:func:`.lm_stage.prefill`) of a core's prompts, ``inputs_embeds`` (B, L,
    C) with the placeholders ``marks`` (B, L) bool (``count`` of them, read once by the caller), K = target_num per
    image, and the images' tower-stage features ``encoded.pooler_output`` (one (W_g ≥ K, C) per image, in prompt
    order); the output is the stock forward's class (:func:`.seams.vlm_output`)."""
    features = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in encoded.pooler_output]  # (W_g, C) each
    check_count(self, count, [self.flowcut_config.target_num] * len(features))
    mask = attention_mask if attention_mask is not None else torch.ones_like(marks, dtype=torch.long)
    return_dict = kwargs.pop("return_dict", None)
    kwargs.pop("cache_position", None)  # 5.0's, of the short layout; the stage counts its own positions
    out = lm_stage.prefill(
        self.language_model,
        lm_stage.expand(inputs_embeds, mask, marks, features),
        self.flowcut_config.target_num,
        positions=position_ids if position_ids is not None else lm_stage.mask_positions(mask),
        mask=attention_mask,
        cache=cache,
        backend=self.flowcut_config.backend,
        **kwargs,
    )
    out = seams.vlm_output(self, out, encoded)
    return returned(self, out, return_dict)


def expand_by_prompt(*names: str):
    """An outer model's ``_expand_inputs_for_generation`` with the language-model stage (beams,
    num_return_sequences): each prompt's images — ``model_kwargs[name]`` for ``names``, one row per image — are
    repeated as a group, [A1, A2] → [A1, A2, A1, A2], as recent 5.x does for pre-encoded features; the stock
    expansion, [A1, A1, A2, A2], would give a prompt of several images the wrong ones."""

    def expand(self: nn.Module, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        images = {name: model_kwargs.pop(name, None) for name in names}
        input_ids, model_kwargs = seams.stock_expand_inputs(self)(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        marks = placeholders(self.model, input_ids, model_kwargs.get("inputs_embeds"))[::expand_size]
        per_prompt = (marks.sum(1) // self.flowcut_config.target_num).tolist()
        for name, value in images.items():
            if value is not None:
                groups = value.split(per_prompt) if sum(per_prompt) == len(value) else [value]  # else: refused later
                model_kwargs[name] = torch.cat([group for group in groups for _ in range(expand_size)])
        return input_ids, model_kwargs

    return expand


def install(model, core, config, processor, count, unpatch, image_features, expand) -> None:
    """Set a LLaVA-like patch afresh on its instances. ``processor`` (None: the one a previous patch kept) gets
    ``count(processor, config.target_num)``'s attributes, read before ``unpatch(model)`` restores the stock model
    (and a replaced processor); ``core`` gets ``image_features`` as its ``get_image_features``, the placeholder check,
    ``config`` and ``processor``; with the stage, :func:`staged_forward`, and the outer ``model`` pixels for the
    prefill and ``expand`` (:func:`expand_by_prompt`) for beams."""
    if processor is None:
        processor = vars(core).get("_flowcut_processor")  # a re-apply keeps the model's processor
    counting = count(processor, config.target_num) if processor is not None else {}
    unpatch(model)  # a re-apply starts from the stock model (and restores a replaced processor)
    if processor is not None:
        set_attrs(processor, **counting)
    set_attrs(
        core,
        get_image_features=types.MethodType(image_features, core),
        get_placeholder_mask=types.MethodType(_checked_placeholder_mask, core),
        flowcut_config=config,
        _flowcut_processor=processor,
    )
    if config.llm_stage:
        set_attrs(core, forward=types.MethodType(staged_forward, core))
    if model is not core:
        set_attrs(model, flowcut_config=config)
        if config.llm_stage:
            set_attrs(model, **seams.generate_hooks(model, expand))

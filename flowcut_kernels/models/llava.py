"""FlowCut for HF LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``) and its ``LlavaProcessor``.

The patch replaces two methods on the one ``LlavaModel`` instance (never on its class):

- ``get_image_features``: runs the vision tower's layers 0 … F with FlowCut pruning (F = L +
  ``vision_feature_layer``; later layers are not run), each image on its own schedule (docs/semantics.md's batch
  maximum taken over that image alone, so that a prompt's output does not depend on what it is batched
  with, as ``generate`` users expect), drops the CLS row (CLIP towers), and applies the
  model's own ``multi_modal_projector``. It returns what the stock method returns in transformers 5.x: an
  output whose ``pooler_output`` is the list of per-image projected features, here (target_num, C_text)
  each. ``forward`` and ``generate`` (which in recent 5.x pre-encodes the images through
  ``model.base_model.get_image_features``) both reach it.
- ``get_placeholder_mask``: the stock check, preceded by one that names the fix when the prompt's
  image-token count is not ``target_num`` per image (a processor that still expands ``<image>`` to the
  unpruned count).

With ``llm_stage=True`` (docs/semantics.md, the language-model stage) the tower keeps 2·target_num tokens per image
and a third method is replaced:

- ``forward``: a call whose prompts hold images (a prefill) runs :func:`.lm_stage.prefill`: the language model's
  layers 0 and 1 see each image's 2·target_num features in place of its target_num placeholders, layer 1 keeps
  target_num of them, text-guided, and the later layers and the cache see the prompt's own layout. Other calls
  (decode steps, text-only prompts) are the stock forward. The prompts keep target_num placeholders per image, so
  ``generate`` sees the final length; recent 5.x ``generate`` is made to pass the pixels to that prefill instead of
  pre-encoding them (``_supports_mm_encoder_outputs`` on the outer model, as 5.0 does): its pre-encoded path pairs
  features with placeholders by count, and the stage has more features than placeholders. The outer model's
  ``_expand_inputs_for_generation`` (beams, several sequences) then repeats each prompt's images as a group.

The processor, when given, is made to expand each ``<image>`` to ``target_num`` placeholders, for any
target: its count is ``(height // patch_size) · (width // patch_size) + num_additional_image_tokens``
(− 1 with the "default" strategy) in every 5.x release, so ``patch_size`` is set above any image size
(the product is 0) and ``num_additional_image_tokens`` carries the count. Both values are restored by
:func:`unpatch_llava`.

Towers: CLIP (CLS variant, strategy "default": the CLS row is dropped as in stock LLaVA-1.5) and SigLIP
(mean-query variant, no CLS row: all target_num kept tokens reach the projector, with either strategy;
stock LLaVA would drop SigLIP's first patch under "default", which only makes sense for a CLS row).
Features are the feature layer's raw output, as stock LLaVA takes ``hidden_states[vision_feature_layer]``
(no post-layernorm).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, require
from . import lm_stage, seams
from .encoder import PACKED_OPS, check_pixels, check_target, feature_index, run_pruned
from .instance import is_patched, prior_attr, restore_patch, set_attrs
from .policy import FlowCutPolicy
from .schedule import StaticPolicy, check_schedule
from .registry import Family, FlowCutConfig, find_tower, is_tower, supported_towers
from .tower import Tower


@dataclass
class FlowCutImageFeatures(seams.BaseModelOutputWithPooling):
    r"""What a patched LLaVA's ``get_image_features`` returns.

    last_hidden_state: (B, T, C_vision) output of the feature layer on the kept tokens (T = 1 + target_num
        with the CLS row first for CLIP towers, target_num for SigLIP).
    pooler_output: list of B tensors (target_num, C_text): the projected features, one per image, as the
        stock method returns them (2·target_num each with ``llm_stage``: the tower stage's).
    hidden_states: (with output_hidden_states) one tuple per image: its embeddings (1, S₀, C_vision) and each
        run layer's output before that layer's pruning (token counts shrink along it, per image).
    keep_indices: (B, target_num) int64 ascending original patch indices of the kept patches.
    tokens_per_layer: one list per image: the tokens each run layer 0 … F processed.

    Each image is pruned on its own schedule (docs/semantics.md with a batch of one), so the features of an image
    do not depend on the other images of the batch, and batched prompts give their single-prompt results.
    """

    keep_indices: Tensor | None = None
    tokens_per_layer: list[int] | None = None


def classes() -> tuple[type, type]:
    from transformers import LlavaForConditionalGeneration, LlavaModel

    return LlavaForConditionalGeneration, LlavaModel


def is_llava(model) -> bool:
    """Whether ``model`` is a ``LlavaForConditionalGeneration`` or a ``LlavaModel``."""
    return isinstance(model, classes())


def llava_core(model: nn.Module) -> nn.Module:
    """The ``LlavaModel`` of a ``LlavaForConditionalGeneration`` (or the ``LlavaModel`` itself)."""
    return model.model if isinstance(model, classes()[0]) else model


def llava_tower(core: nn.Module) -> Tower:
    """The vision tower of a ``LlavaModel``, or a FlowCutInputError naming the supported towers."""
    if not is_tower(core.vision_tower):
        raise FlowCutInputError(
            f"model's vision tower is a {type(core.vision_tower).__name__}, which FlowCut does not support; "
            f"a LLaVA model is supported with one of {supported_towers()} as its vision tower"
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


def _pruned_image_features(
    self: nn.Module,
    pixel_values: Tensor,
    vision_feature_layer: int | list[int] | None = None,
    vision_feature_select_strategy: str | None = None,
    image_sizes: Tensor | None = None,
    **kwargs,
):
    """Patched ``LlavaModel.get_image_features``: (B, 3, H, W) pixels → B projected (target_num, C_text) features.

    Returns a :class:`FlowCutImageFeatures` (a tuple with ``return_dict=False``), like the stock method.
    """
    config = self.flowcut_config
    tower = llava_tower(self)
    if vision_feature_layer is None:
        vision_feature_layer = self.config.vision_feature_layer
    if vision_feature_select_strategy is None:
        vision_feature_select_strategy = self.config.vision_feature_select_strategy
    feature_layer = feature_layer_of(vision_feature_layer, len(tower.layers))
    check_strategy(vision_feature_select_strategy, tower)
    require(
        image_sizes is None,
        "image_sizes is not supported by FlowCut's LLaVA patch (LLaVA-1.5 takes fixed-size images); leave it unset",
    )
    return_dict = kwargs.pop("return_dict", None)
    output_hidden_states = kwargs.pop("output_hidden_states", None)
    if kwargs.pop("output_attentions", None):
        raise FlowCutInputError(
            "output_attentions=True is unavailable on a FlowCut-patched vision tower: it never builds the attention "
            "matrix; call flowcut_kernels.remove_flowcut(model) first"
        )
    interpolate = bool(kwargs.pop("interpolate_pos_encoding", False))
    require(pixel_values is not None, "pixel_values is required: pass (B, 3, H, W) images")
    if isinstance(pixel_values, Tensor):  # as the stock tower's forward would, under a device map
        pixel_values = pixel_values.to(tower.device)
    check_pixels(pixel_values, tower)

    hidden = tower.embed(pixel_values, interpolate)
    target_num = check_target(config.tower_target, hidden.shape[1] - int(tower.has_cls))
    backend = ops.resolve_backend(config.backend, tower.device, tower.dtype, PACKED_OPS)
    feature_idx = len(tower.layers) + feature_layer
    # Each image on its own schedule (docs/semantics.md, "Batches"), all images in one tower pass: a prompt's
    # result never depends on its batch.
    layer_outputs = [list(hidden)] if output_hidden_states else None
    static = config.schedule is not None  # the same counts for every image: one dense batch, no host read
    if static:
        check_schedule(config.schedule, tower, feature_idx, target_num)
    policy = StaticPolicy(config.schedule, tower.has_cls) if static else FlowCutPolicy(target_num, tower.has_cls)
    last, keep_indices, tokens = run_pruned(
        tower, hidden, policy, feature_idx, backend, layer_outputs, per_image=not static, **kwargs
    )
    if static:
        tokens = [tokens] * len(hidden)
    features = last[:, 1:] if tower.has_cls else last
    projected = self.multi_modal_projector(features)
    states = None
    if output_hidden_states:  # per image: its embeddings and each run layer's output, (1, S, C) each
        states = tuple(tuple(layer[b][None] for layer in layer_outputs) for b in range(len(hidden)))
    out = FlowCutImageFeatures(
        last_hidden_state=last,
        pooler_output=list(projected),
        hidden_states=states,
        keep_indices=keep_indices,
        tokens_per_layer=tokens,
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _placeholders(core: nn.Module, input_ids, inputs_embeds) -> Tensor:
    """(B, L) bool: the prompts' image placeholders, from ``input_ids`` or, without them, from the embeddings."""
    token_id = core.config.image_token_id
    if input_ids is not None:
        return input_ids == token_id
    embedded = core.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
    return (inputs_embeds == embedded).all(-1)


def _check_count(core: nn.Module, n_tokens: int, images: int) -> None:
    """The prompts must hold target_num placeholders per image; else the fix is to pass the processor."""
    target = core.flowcut_config.target_num
    if n_tokens != images * target:
        raise FlowCutInputError(
            f"the prompts hold {n_tokens} image placeholder tokens, but FlowCut gives the language model "
            f"{target} tokens per image ({images * target} for {images} image(s)): the processor still "
            f"expands each image token to the unpruned count; pass it when patching, "
            f"flowcut(model, {target}, processor=processor), and process the prompts again "
            f"(or build input_ids with {target} image tokens per image)"
        )


def _checked_placeholder_mask(self: nn.Module, input_ids, inputs_embeds, image_features):
    """Patched ``LlavaModel.get_placeholder_mask``: a mismatch names the fix (pass the processor), then stock."""
    images = image_features.numel() // inputs_embeds.shape[-1] // self.flowcut_config.target_num
    _check_count(self, int(_placeholders(self, input_ids, inputs_embeds).sum()), images)
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
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    placeholders = _placeholders(self, input_ids, inputs_embeds)
    if encoded is None:
        images = len(image_sizes) if image_sizes is not None else len(pixel_values)
        _check_count(self, int(placeholders.sum()), images)
        encoded = self.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
            return_dict=True,
        )
    features = [f.to(inputs_embeds.device, inputs_embeds.dtype) for f in encoded.pooler_output]  # (W_g, C) each
    _check_count(self, int(placeholders.sum()), len(features))
    mask = attention_mask if attention_mask is not None else torch.ones_like(placeholders, dtype=torch.long)
    return_dict = kwargs.pop("return_dict", None)
    kwargs.pop("cache_position", None)  # 5.0's, of the short layout; the stage counts its own positions
    out = lm_stage.prefill(
        self.language_model,
        lm_stage.expand(inputs_embeds, mask, placeholders, features),
        self.flowcut_config.target_num,
        positions=position_ids if position_ids is not None else lm_stage.mask_positions(mask),
        mask=attention_mask,
        cache=cache,
        backend=self.flowcut_config.backend,
        **kwargs,
    )
    out = seams.vlm_output(self, out, encoded)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _expand_by_prompt(self: nn.Module, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
    """The outer model's ``_expand_inputs_for_generation`` with llm_stage (beams, num_return_sequences): each prompt's
    images are repeated as a group, [A1, A2] → [A1, A2, A1, A2], as recent 5.x does for pre-encoded features; the
    stock expansion of the pixels, [A1, A1, A2, A2], would give a prompt of several images the wrong ones."""
    pixels = model_kwargs.pop("pixel_values", None)
    input_ids, model_kwargs = seams.stock_expand_inputs(self)(
        expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
    )
    if pixels is not None:
        placeholders = _placeholders(self.model, input_ids, model_kwargs.get("inputs_embeds"))[::expand_size]
        per_prompt = (placeholders.sum(1) // self.flowcut_config.target_num).tolist()
        groups = pixels.split(per_prompt) if sum(per_prompt) == len(pixels) else [pixels]  # else: forward refuses
        model_kwargs["pixel_values"] = torch.cat([group for group in groups for _ in range(expand_size)])
    return input_ids, model_kwargs


def check_processor(processor, model: nn.Module, core: nn.Module) -> None:
    """``processor`` must be a ``LlavaProcessor`` with the model's image token, not patched for another model."""
    from transformers import LlavaProcessor

    require(
        isinstance(processor, LlavaProcessor),
        f"processor is a {type(processor).__name__}; pass the model's LlavaProcessor (e.g. "
        f"AutoProcessor.from_pretrained of the same checkpoint), whose image-token expansion FlowCut adjusts",
    )
    model_token = core.config.image_token_id
    require(
        processor.image_token_id == model_token,
        f"processor does not match the model: its image token {processor.image_token!r} has id "
        f"{processor.image_token_id}, but the model's config.image_token_id is {model_token}; pass the processor "
        f"of the model's checkpoint",
    )
    owner = vars(core).get("_flowcut_processor")
    require(
        not is_patched(processor) or owner is processor,
        "processor is already patched by flowcut() for another model; call remove_flowcut() on that model first, "
        "or pass a separate processor instance (e.g. copy.deepcopy(processor))",
    )


def _check_llava(
    model: nn.Module, target_num: int, feature_layer, backend: str, processor, llm_stage: bool
) -> tuple[int, int]:
    """Validate a LLaVA patch before anything changes; returns (target_num, feature_layer) resolved."""
    core = llava_core(model)
    tower = llava_tower(core)
    num_layers = len(tower.layers)
    configured = feature_layer_of(core.config.vision_feature_layer, num_layers, "model.config.vision_feature_layer")
    if feature_layer is not None:
        require(
            feature_index(feature_layer, num_layers) - num_layers == configured,
            f"feature_layer={feature_layer} differs from the model's config.vision_feature_layer "
            f"({core.config.vision_feature_layer}), whose features its projector was trained on; leave feature_layer "
            f"unset for a LLaVA model",
        )
    check_strategy(core.config.vision_feature_select_strategy, tower, "model.config.vision_feature_select_strategy")
    target_num = check_target(target_num, tower.num_patches)
    ops.resolve_backend(backend, tower.device, tower.dtype, PACKED_OPS)
    if llm_stage:
        require(
            2 * target_num < tower.num_patches,
            f"target_num={target_num} is too large for llm_stage=True: the tower stage keeps 2·target_num = "
            f"{2 * target_num} of its {tower.num_patches} patches per image, which must be fewer; use target_num <= "
            f"{(tower.num_patches - 1) // 2}, or leave llm_stage unset",
        )
        text_model = core.language_model
        lm_stage.check_decoder(text_model)
        ops.resolve_backend(backend, text_model.device, text_model.dtype, lm_stage.STAGE_OPS)
    if processor is not None:
        check_processor(processor, model, core)
    return target_num, configured


def patch_llava(
    model: nn.Module, target_num: int, *, feature_layer=None, backend="auto", processor=None, llm_stage=None,
    schedule=None,
) -> None:
    """Check every argument, then patch the LLaVA ``model`` (and ``processor``); see the module docstring."""
    require(llm_stage in (None, False, True), f"llm_stage must be True, False or None, got {llm_stage!r}")
    target_num, feature_layer = _check_llava(model, target_num, feature_layer, backend, processor, bool(llm_stage))
    config = FlowCutConfig(target_num, feature_layer, backend, bool(llm_stage), schedule)
    tower = llava_tower(llava_core(model))
    check_schedule(schedule, tower, len(tower.layers) + feature_layer, config.tower_target)
    core = llava_core(model)
    if processor is None:
        processor = vars(core).get("_flowcut_processor")  # a re-apply keeps the model's processor
    counting = seams.llava_count(processor, target_num) if processor is not None else {}
    unpatch_llava(model)  # a re-apply starts from the stock model (and restores a replaced processor)
    if processor is not None:
        set_attrs(processor, **counting)
    install(model, core, config, processor, _pruned_image_features, _expand_by_prompt)


def install(model, core, config, processor, image_features, expand_by_prompt) -> None:
    """Set a LLaVA-like patch on its instances: ``core`` gets ``image_features`` as its ``get_image_features``, the
    placeholder check, ``config`` and ``processor``; with the stage, :func:`staged_forward`, and the outer ``model``
    pixels for the prefill and ``expand_by_prompt`` for beams."""
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
            set_attrs(model, **seams.generate_hooks(model, expand_by_prompt))


def unpatch_llava(model: nn.Module) -> None:
    """Undo :func:`patch_llava`: the model's and the processor's attributes are restored exactly."""
    restore_patch(model, llava_core(model))


FAMILY = Family(
    "llava",
    classes,
    patch_llava,
    unpatch_llava,
    label="LlavaForConditionalGeneration, LlavaModel (with a CLIP or SigLIP vision tower)",
)

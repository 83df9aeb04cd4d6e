"""Real checkpoints for ``flowcut-bench --model``: a LLaVA, CLIP or SigLIP model loaded with ``from_pretrained``.

:func:`inspect` reads the configuration alone (``AutoConfig``: cheap, for the usage checks made before any
weight is loaded) and picks the family from it; :func:`load` then loads the weights in the run's dtype with
SDPA attention, moves them to the device, and returns the :class:`~flowcut_kernels.bench.presets.Built` the
methods of :mod:`.presets` run on, measured as the presets measure theirs:

- CLIP (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, or the vision tower of a ``CLIPModel``
  checkpoint, which is how LLaVA loads its tower) and SigLIP (``SiglipVisionModel``, or the vision tower of a
  ``SiglipModel``): the tower alone, like ``--preset clip-l-336``; the unpruned features drop the CLS row
  (CLIP) or keep every row (SigLIP, which has none);
- LLaVA (``LlavaForConditionalGeneration`` with a CLIP or SigLIP tower): the prefill, like the ``llava-*``
  presets — the tower, the model's own projector and language model on a seeded random prompt of
  :data:`~.presets.PROMPT_TOKENS` tokens with the image after :data:`~.presets.IMAGE_POSITION`; the feature
  layer is the model's ``vision_feature_layer``, and the unpruned features drop row 0 under its
  ``vision_feature_select_strategy`` "default", as stock LLaVA does.

A folder is read as it is; any other name is a Hub id, looked up in the local Hugging Face cache only
(``local_files_only=True``): nothing is downloaded.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..checks import FlowCutInputError
from ..models.vlm import feature_layer_of
from . import presets

#: model_type of a configuration -> (family, vision class loaded). Two-tower checkpoints give their vision tower.
VISION_TYPES = {
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "clip": ("clip", "CLIPVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
    "siglip": ("siglip", "SiglipVisionModel"),
}
SUPPORTED = ("LlavaForConditionalGeneration (CLIP or SigLIP tower), CLIPVisionModel, CLIPVisionModelWithProjection, "
             "SiglipVisionModel (or the vision tower of a CLIPModel / SiglipModel checkpoint)")


class CheckpointError(ValueError):
    """A checkpoint ``--model`` cannot measure; the message names the problem."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's configuration, checked.

    source: the folder or Hub id as given; local: a folder (else the Hub cache, ``local_files_only``).
    class_name: the transformers class :func:`load` uses. num_patches, num_layers: the vision tower's.
    feature_layer: LLaVA's configured feature layer as a negative index, None for a bare tower.
    drop_first: the unpruned features drop row 0. description: one line for the printout. two_tower: a CLIPModel
    or SiglipModel checkpoint, of which the vision tower alone is loaded.
    """

    source: str
    local: bool
    class_name: str
    family: str
    num_patches: int
    num_layers: int
    feature_layer: int | None
    drop_first: bool
    description: str
    two_tower: bool


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` can only be a path (a Hub id is ``name`` or ``owner/name``)."""
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1


def _config(source: str, local: bool):
    from transformers import AutoConfig

    if local:
        try:
            return AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"the folder holds no readable model configuration (config.json): {error}") from None
    if os.path.exists(source):
        raise CheckpointError("this is a file; pass the checkpoint's folder (the one holding config.json)")
    if _looks_like_path(source):
        raise CheckpointError("no such folder")
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        from huggingface_hub import constants

        raise CheckpointError(
            f"not a folder, and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}): a Hub id is looked "
            "up there only (local_files_only=True), flowcut-bench downloads nothing"
        ) from None
    except ValueError as error:
        raise CheckpointError(f"no readable model configuration in the Hugging Face cache: {error}") from None


def inspect(source: str) -> Checkpoint:
    """Read and check the configuration of ``source`` (a folder or a Hub id in the local cache).

    Raises :class:`CheckpointError` for a missing checkpoint, an unreadable or unsupported configuration.
    """
    local = os.path.isdir(source)
    config = _config(source, local)
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type == "llava":
        return _llava(source, local, config)
    if config.model_type not in VISION_TYPES:
        raise CheckpointError(
            f"a {config.model_type!r} checkpoint ({', '.join(architectures) or 'no architecture named'}), which "
            f"flowcut-bench cannot measure; it measures {SUPPORTED}"
        )
    family, class_name = VISION_TYPES[config.model_type]
    if "CLIPVisionModelWithProjection" in architectures:
        class_name = "CLIPVisionModelWithProjection"
    two_tower = not config.model_type.endswith("_vision_model")
    vision = config.vision_config if two_tower else config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    whole = architectures[0] if architectures else config.model_type
    return Checkpoint(
        source, local, class_name, family, num_patches, vision.num_hidden_layers, None, family == "clip",
        f"{class_name}{f', the vision tower of a {whole} checkpoint' if two_tower else ''}: "
        f"{vision.num_hidden_layers} layers, {num_patches} patches",
        two_tower,
    )


def _llava(source: str, local: bool, config) -> Checkpoint:
    vision = config.vision_config
    if vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise CheckpointError(f"a LLaVA whose vision tower is a {vision.model_type!r}; FlowCut prunes CLIP and "
                              "SigLIP towers")
    has_cls = vision.model_type == "clip_vision_model"
    tower = "CLIP" if has_cls else "SigLIP"
    try:
        feature_layer = feature_layer_of(config.vision_feature_layer, vision.num_hidden_layers,
                                         "config.vision_feature_layer")
    except FlowCutInputError as error:
        raise CheckpointError(str(error)) from None
    strategy = config.vision_feature_select_strategy
    allowed = ("default",) if has_cls else ("default", "full")
    if strategy not in allowed:
        raise CheckpointError(
            f"config.vision_feature_select_strategy={strategy!r}: FlowCut supports {' or '.join(map(repr, allowed))} "
            f"with a {tower} tower"
        )
    num_patches = (vision.image_size // vision.patch_size) ** 2
    return Checkpoint(
        source, local, "LlavaForConditionalGeneration", "llava", num_patches, vision.num_hidden_layers,
        feature_layer, strategy == "default",
        f"LlavaForConditionalGeneration: {tower} tower ({vision.num_hidden_layers} layers, {num_patches} patches) "
        f"+ projector + {config.text_config.model_type} language model, {presets.PROMPT_TOKENS}-token prompt",
        False,
    )


@contextmanager
def _quiet_loading(quiet: bool):
    """transformers' load report silenced (it lists a two-tower checkpoint's text tower as unused weights)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    if quiet:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, seed: int) -> presets.Built:
    """Load ``checkpoint`` in ``dtype`` with SDPA attention, on ``device``, in eval mode (see the module docstring)."""
    import transformers

    cls = getattr(transformers, checkpoint.class_name)
    options = dict(dtype=dtype, attn_implementation="sdpa")
    if not checkpoint.local:
        options["local_files_only"] = True
    with _quiet_loading(checkpoint.two_tower):
        model = cls.from_pretrained(checkpoint.source, **options).to(device).eval()
    size = presets.weights_mb(model)
    if checkpoint.family != "llava":
        return presets.Built(checkpoint.source, model, None, checkpoint.drop_first, size)
    # Text tokens only: ids below the image token (LLaVA-1.5 appends it to the text vocabulary).
    vocab = min(model.config.text_config.vocab_size, model.config.image_token_id)
    prompt = presets.random_prompt(presets.PROMPT_TOKENS, vocab, device, seed)
    prefill = presets.LlavaPrefill(model.model.multi_modal_projector, model, prompt, presets.IMAGE_POSITION).eval()
    return presets.Built(checkpoint.source, model.model.vision_tower, prefill, checkpoint.drop_first, size)

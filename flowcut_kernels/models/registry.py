"""The model families FlowCut patches, and the two calls that dispatch to them.

A family is one module (``clip.py``, ``siglip.py``, ``llava.py``, …) that exports a :class:`Family`;
``models/__init__.py`` registers each with one line. :func:`flowcut` / :func:`remove_flowcut` find the
family of a model by its class; :func:`find_tower` gives :func:`~flowcut_kernels.encode` the
:class:`~flowcut_kernels.models.tower.Tower` of a bare vision model. Nothing here knows a model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..checks import FlowCutInputError
from . import seams
from .tower import Tower


@dataclass(frozen=True)
class FlowCutConfig:
    """What a patched model does: keep ``target_num`` patches at layer F = L + ``feature_layer`` (None for a family
    whose feature layer is fixed: Qwen2-VL's merger takes the tower's last layer).

    With ``llm_stage`` the tower keeps ``tower_target`` = 2·target_num patches per image and the language model's
    decoder layer 1 keeps ``target_num`` of them (docs/semantics.md).
    """

    target_num: int
    feature_layer: int | None
    backend: str
    llm_stage: bool = False
    schedule: object = None  # a StaticSchedule of the tower's counts, or None: FlowCut's adaptive schedule

    @property
    def tower_target(self) -> int:
        """Patches the vision tower keeps per image."""
        return 2 * self.target_num if self.llm_stage else self.target_num


@dataclass(frozen=True)
class Family:
    """A model family: the HF classes it handles and how to patch them.

    classes: returns the HF classes (imported lazily, so an old transformers without one still loads).
    patch: ``patch(model, target_num, feature_layer=…, backend=…, processor=…, llm_stage=…, schedule=…)`` checks
        every argument first (a FlowCutInputError leaves the model unchanged), then patches this instance.
    unpatch: ``unpatch(model)`` restores the instance (and its processor) exactly.
    tower: for bare vision models, ``tower(model)`` → their :class:`Tower` (what ``encode`` runs).
    label: how error messages name the family's classes.
    in_llava: whether LLaVA-like models (``llava.py``, ``llava_next.py``) accept this tower as their vision tower.
    """

    name: str
    classes: Callable[[], tuple[type, ...]]
    patch: Callable[..., None]
    unpatch: Callable[[nn.Module], None]
    tower: Callable[[nn.Module], Tower] | None = None
    label: str | None = None
    in_llava: bool = True


FAMILIES: list[Family] = []


def register(family: Family) -> None:
    """Add ``family`` (replacing one of the same name)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name] + [family]


def family_of(model) -> Family | None:
    """The registered family whose classes ``model`` is an instance of, or None."""
    return next((f for f in FAMILIES if isinstance(model, f.classes())), None)


def _names(families) -> str:
    return ", ".join(f.label or ", ".join(c.__name__ for c in f.classes()) for f in families)


def supported_towers(in_llava: bool = False) -> str:
    """The vision-model classes :func:`find_tower` accepts (``in_llava``: those a LLaVA model accepts), for
    messages."""
    return _names(f for f in FAMILIES if f.tower is not None and (f.in_llava or not in_llava))


def is_tower(model, in_llava: bool = False) -> bool:
    """Whether ``model`` is a bare vision model of a registered family (``in_llava``: one a LLaVA model accepts)."""
    family = family_of(model)
    return family is not None and family.tower is not None and (family.in_llava or not in_llava)


def find_tower(model: nn.Module, argument: str = "model") -> Tower:
    """The :class:`Tower` of a supported vision model, or a FlowCutInputError naming what is supported."""
    if not is_tower(model):
        raise FlowCutInputError(
            f"{argument} is a {type(model).__name__}, which FlowCut does not support; pass one of "
            f"{supported_towers()}"
        )
    return family_of(model).tower(model)


def flowcut(
    model: nn.Module,
    target_num: int,
    *,
    feature_layer: int | None = None,
    backend: str = "auto",
    processor=None,
    llm_stage: bool | None = None,
    schedule=None,
) -> nn.Module:
    """Make ``model`` prune its visual tokens with FlowCut; returns the same model.

    Args:
        model: a HF ``LlavaForConditionalGeneration`` or ``LlavaModel`` with a CLIP or SigLIP vision tower, or
            a vision model alone: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``,
            ``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``.
            This instance only is patched.
        target_num: patches kept per image, 1 ≤ target_num < N₀ (the tower's patch count; 2·target_num < N₀ with
            ``llm_stage``). A LLaVA language model's prompts hold exactly ``target_num`` image tokens per image.
        feature_layer: negative index of the feature layer. Vision models: default -1 (the last layer), and
            the output's ``last_hidden_state`` is its output. LLaVA: the model's
            ``config.vision_feature_layer`` (leave unset, or pass the same layer). Layers after it are not run.
        backend: "auto" or a name from :func:`flowcut_kernels.available_backends`, resolved at each
            forward for the model's device.
        processor: LLaVA: the model's ``LlavaProcessor``; this instance is made to expand each ``<image>`` to
            ``target_num`` placeholders (other instances are untouched, ``remove_flowcut`` restores it).
            Without it, prompts must already hold ``target_num`` image tokens per image, and a forward
            whose count differs fails with a message saying to pass it. Vision models: not needed (their
            image processor does not depend on the token count); accepted and left untouched.
        llm_stage: the language-model stage (docs/semantics.md): the tower keeps about 2·target_num tokens per
            image and decoder layer 1 keeps target_num of them, text-guided. None: the family's recipe
            default (off for LLaVA-1.5 and InternVL; on for LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL/2.5-VL and
            Qwen3-VL); refused by families without a language model or whose decoder the stage cannot run (Gemma 3,
            Qwen3.5).
        schedule: a :class:`~flowcut_kernels.StaticSchedule` (from :func:`~flowcut_kernels.calibrate_schedule`
            on this model) to prune with fixed per-layer counts — no host reads, compiles with
            ``torch.compile(fullgraph=True)`` — or None for FlowCut's adaptive schedule. CLIP/SigLIP towers and
            LLaVA-1.5 (its tower keeps the schedule's last count: 2·target_num with ``llm_stage``).

    A patched vision model's forward returns a :class:`~flowcut_kernels.FlowCutVisionOutput` (CLIP, SigLIP) or
    a :class:`~flowcut_kernels.FlowCutVisionProjectionOutput` (``CLIPVisionModelWithProjection``); the kept
    indices are its ``keep_indices``. A patched LLaVA model's ``get_image_features`` returns a
    :class:`~flowcut_kernels.FlowCutImageFeatures`, and its ``forward``/``generate`` run on the pruned
    features. Applying again replaces the settings (a LLaVA model keeps the processor it was given, updated
    to the new target, unless another is passed); :func:`remove_flowcut` undoes it. Bad arguments raise
    :class:`~flowcut_kernels.FlowCutInputError` and leave the model (and the processor) unchanged.
    """
    family = family_of(model)
    if family is None:
        raise FlowCutInputError(
            f"model is a {type(model).__name__}, which FlowCut does not support; pass one of {_names(FAMILIES)}"
        )
    seams.check_release()
    family.patch(
        model, target_num, feature_layer=feature_layer, backend=backend, processor=processor, llm_stage=llm_stage,
        schedule=schedule,
    )
    return model


def remove_flowcut(model: nn.Module) -> nn.Module:
    """Undo :func:`flowcut` on ``model`` and its processor (a no-op on an unpatched model); returns the model."""
    family = family_of(model)
    if family is not None:
        family.unpatch(model)
    return model

"""CLIP vision towers (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``): the CLS variant.

Row 0 is the CLS relay token; layer 0's input is ``pre_layrnorm(embeddings(pixels))``
(:meth:`Tower.embed`). Patched with the shared vision-model patch (:mod:`.vision`).
"""

from __future__ import annotations

from .registry import Family
from .tower import Tower, core_of
from .vision import patch_vision_model, unpatch_vision_model


def classes() -> tuple[type, ...]:
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    return CLIPVisionModel, CLIPVisionModelWithProjection


FAMILY = Family(
    "clip", classes, patch_vision_model, unpatch_vision_model, tower=lambda model: Tower(core_of(model), has_cls=True)
)

"""SigLIP vision towers (``SiglipVisionModel``): the mean-query variant.

No CLS row: the relay is the mean query over the image's tokens, and every kept token is a feature;
layer 0's input is ``embeddings(pixels)``. Patched with the shared vision-model patch (:mod:`.vision`).
"""

from __future__ import annotations

from .registry import Family
from .tower import Tower, core_of
from .vision import patch_vision_model, unpatch_vision_model


def classes() -> tuple[type, ...]:
    from transformers import SiglipVisionModel

    return (SiglipVisionModel,)


FAMILY = Family(
    "siglip", classes, patch_vision_model, unpatch_vision_model,
    tower=lambda model: Tower(core_of(model), has_cls=False),
)

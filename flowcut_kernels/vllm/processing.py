"""The served classes' processing side, shared by the families: K_b placeholders per image (docs/vllm.md).

Each served class is vLLM's own model class with a family's FlowCut mixin, tied to vLLM's own processor, processing
info and dummy-input classes with the mixins below (:func:`served`). Without ``flowcut`` in the model's config every
override hands over to vLLM's method.
"""

from __future__ import annotations

from ..checks import require
from . import seams
from .config import options


class FlowCutInfo:
    """Mixin for a processing-info class: K_b = min(K, stock) placeholders per image (``get_num_image_tokens``, so
    vLLM's token and encoder budgeting counts K_b), K for the largest image (checked against its stock count), no
    videos."""

    def flowcut_target(self) -> int | None:
        found = options(self.get_hf_config())
        return None if found is None else found.target_num

    def count_kwargs(self) -> dict:
        """The keywords the family's stock ``get_num_image_tokens`` takes besides the image's size."""
        return {}

    def get_num_image_tokens(self, **kwargs) -> int:
        tokens = super().get_num_image_tokens(**kwargs)
        target = self.flowcut_target()
        return tokens if target is None else min(target, tokens)

    def get_max_image_tokens(self) -> int:
        target = self.flowcut_target()
        if target is None:
            return super().get_max_image_tokens()
        width, height = self.get_image_size_with_most_features()
        most = super().get_num_image_tokens(image_width=width, image_height=height, **self.count_kwargs())
        require(target <= most, f"flowcut.target_num={target} is more than the {most} tokens (merge groups) of the "
                                f"largest image this model's processor makes; set flowcut.target_num <= {most}")
        return target

    def get_supported_mm_limits(self):
        limits = dict(super().get_supported_mm_limits())
        if self.flowcut_target() is not None and "video" in limits:
            limits["video"] = 0  # FlowCut prunes images only
        return limits


class FlowCutProcessor:
    """Mixin for a multimodal processor: each image's placeholders are the first K_b of the stock ones."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        target = self.info.flowcut_target()
        if target is None:
            return updates
        return [seams.truncated_update(u, target) if u.modality == "image" else u for u in updates]


def require_pixels(image_input) -> None:
    """A served model's image input must be pixels: FlowCut's scores come from the vision tower."""
    require(image_input["type"] == "pixel_values",
            "image embeddings cannot be pruned by FlowCut (its scores come from the vision tower); pass images, "
            "or serve without the 'flowcut' key")


def served(stock_module, family: str, mixins: tuple[type, type], module: str, *, other=None) -> type:
    """vLLM's ``{family}ForConditionalGeneration`` of ``stock_module`` with the model mixin ``mixins[0]``, tied to
    its ``{family}ProcessingInfo`` with ``mixins[1]`` (a :class:`FlowCutInfo`), its ``{family}MultiModalProcessor``
    with :class:`FlowCutProcessor` and its ``{family}DummyInputsBuilder``; the class is named in ``module``.

    ``other``: for an architecture vLLM serves with more than one processing-info class (LLaVA: also Pixtral's), a
    function of the processing context that is True where vLLM's own classes must process it; they then do.
    """
    stock = getattr(stock_module, f"{family}ForConditionalGeneration")
    info = type(f"FlowCut{family}ProcessingInfo", (mixins[1], getattr(stock_module, f"{family}ProcessingInfo")), {})
    processor = type(f"FlowCut{family}MultiModalProcessor",
                     (FlowCutProcessor, getattr(stock_module, f"{family}MultiModalProcessor")), {})
    model = type(f"FlowCut{stock.__name__}", (mixins[0], stock), {"__module__": module})
    dummy = getattr(stock_module, f"{family}DummyInputsBuilder")
    if other is None:
        return seams.register_processor(model, processor, info, dummy)
    stock_info, stock_processor = seams.stock_factories(stock)

    def info_factory(ctx):
        return stock_info(ctx) if other(ctx) else info(ctx)

    def processor_factory(found, dummy_inputs):
        return processor(found, dummy_inputs) if isinstance(found, info) else stock_processor(found, dummy_inputs)

    return seams.register_processor(model, processor_factory, info_factory, dummy)

"""FlowCut in vLLM: an out-of-tree plug-in (vLLM's ``vllm.general_plugins`` entry point, ``flowcut-kernels[vllm]``).

A served model prunes when its config carries ``{"flowcut": {"target_num": K}}``, e.g.
``vllm serve Qwen/Qwen2-VL-2B-Instruct --hf-overrides '{"flowcut": {"target_num": 64}}'`` or
``vllm.LLM(model=..., hf_overrides={"flowcut": {"target_num": 64}})``; without the key it runs as stock vLLM.
Served: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (:mod:`.qwen2_vl`), LLaVA-1.5 (:mod:`.llava`), the tower stage only
(docs/vllm.md says why).
"""

from __future__ import annotations

#: The architectures the plug-in serves, and their classes ("module:Class" in this package).
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl:FlowCutQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl:FlowCutQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "qwen2_vl:FlowCutQwen3VLForConditionalGeneration",
    "LlavaForConditionalGeneration": "llava:FlowCutLlavaForConditionalGeneration",
}


def register() -> None:
    """vLLM's plug-in hook (called in every vLLM process): serve :data:`ARCHITECTURES` with the FlowCut classes.
    They import lazily, and behave as vLLM's own unless the config has the ``flowcut`` key; a config with the key
    is checked as vLLM builds it (:func:`check_served`)."""
    from . import seams

    for architecture, name in ARCHITECTURES.items():
        seams.register_model(architecture, f"{__name__}.{name}")
    seams.on_model_config(check_served)


def check_served(architecture: str, hf_config) -> None:
    """At load: a config with the ``flowcut`` key must hold valid options (errors name ``flowcut.target_num``) and
    be one of :data:`ARCHITECTURES`; otherwise vLLM would serve it unpruned, silently."""
    from ..checks import require
    from .config import options

    if options(hf_config) is None:
        return
    require(architecture in ARCHITECTURES,
            f"flowcut_kernels.vllm serves {', '.join(ARCHITECTURES)}; this model's architecture {architecture} is "
            f"not one of them, so it cannot prune: serve one of those, or drop the 'flowcut' key from the config")

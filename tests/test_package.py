"""The package's face: what a user reaches from ``import flowcut_kernels``."""

import flowcut_kernels
from flowcut_kernels.models.registry import FAMILIES
from flowcut_kernels.ops import native


def test_build_info_is_at_the_top_level():
    assert flowcut_kernels.build_info is native.build_info
    assert "build_info" in flowcut_kernels.__all__


def test_the_docstring_names_every_family():
    names = {"clip": "CLIP", "siglip": "SigLIP", "llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT",
             "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE",
             "qwen3_5": "Qwen3.5", "gemma3": "Gemma 3", "llava_onevision": "LLaVA-OneVision", "vit": "ViT",
             "dinov2": "DINOv2", "internvl": "InternVL"}
    assert {f.name for f in FAMILIES} <= set(names), "a new family: name it in the package docstring and here"
    for family in FAMILIES:
        assert names[family.name] in flowcut_kernels.__doc__

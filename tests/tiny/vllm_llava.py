"""A tiny seeded LLaVA-1.5 checkpoint (CLIP tower) saved to disk, shaped for vLLM's CPU engine (head size 64 in the
tower and the language model), with the processor of :func:`tiny.llava.tiny_llava_processor`."""

from __future__ import annotations

from .llava import random_llava, tiny_llava_processor

#: The tower's input resolution and patch: 112² pixels, 14-pixel patches, 64 patches (and a CLS row).
IMAGE_SIZE, PATCH = 112, 14


def save_tiny_llava(folder: str, *, seed: int = 0, sharpen: float = 8.0) -> str:
    """Write a random float32 ``LlavaForConditionalGeneration`` and its processor to ``folder``.

    Vision: CLIP, 6 layers, width 128, 2 heads, 112² pixels in 14-pixel patches (64 patches), feature layer −2,
    strategy "default"; its q and k multiplied by ``sharpen`` so the tower prunes progressively. Text: Llama, 2
    layers, width 128, 2 query and 1 key/value heads. ``<image>`` is suppressed in generation.
    """
    model = random_llava(
        "clip", seed=seed, sharpen=sharpen, hidden_size=128, intermediate_size=256, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
        text={"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1},
    )
    model.save_pretrained(folder)
    _hub_layout(folder)
    tiny_llava_processor(model).save_pretrained(folder)
    return folder


def _hub_layout(folder: str) -> None:
    """Name the tower's weights as the hub's LLaVA-1.5 checkpoints do (``vision_tower.vision_model.…``, which vLLM
    loads and transformers maps back); recent transformers releases save them without ``vision_model``."""
    import os

    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    prefix = "vision_tower."
    renamed = {(prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) and ".vision_model." not in k
                else k): v for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def prompt(words: str = "w1 w2") -> str:
    """A text prompt with one image: ``USER: <image> {words} ASSISTANT:``."""
    return f"USER: <image> {words} ASSISTANT:"

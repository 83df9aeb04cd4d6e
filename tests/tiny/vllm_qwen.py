"""Tiny seeded Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints saved to disk, shaped for vLLM's CPU engine (vision head
size 80, text head size 64, 14-pixel patches (Qwen3-VL: 16), 2×2 merge), with the processor of
:func:`tiny.text.tiny_qwen_tokenizer`."""

from __future__ import annotations

import torch

from .text import QWEN_WORDS, TINY_WORDS, tiny_qwen_tokenizer

#: Images are resized to 56² … 28²·64 pixels (Qwen3-VL: 64² … 32²·64): at most 64 merge groups (256 patches).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
#: The tower layers whose DeepStack features the tiny Qwen3-VL adds to decoder layers 0 and 1.
DEEPSTACK = [1, 3]
IMAGE, START, END = (QWEN_WORDS.index(w) for w in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))


def _text() -> dict:
    return dict(
        text_config=dict(
            vocab_size=len(QWEN_WORDS), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
        ),
        image_token_id=IMAGE, video_token_id=QWEN_WORDS.index("<|video_pad|>"), vision_start_token_id=START,
        vision_end_token_id=END, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
    )


def save_tiny_qwen(folder: str, arch: str = "qwen2_vl", *, seed: int = 0, sharpen: float = 8.0) -> str:
    """Write a random float32 ``arch`` ("qwen2_vl", "qwen2_5_vl" or "qwen3_vl") checkpoint and its processor to
    ``folder``.

    Vision: 4 blocks, width 160, 2 heads (head size 80, Qwen's; Qwen2.5-VL: 112-pixel windows, full attention in
    block 2; Qwen3-VL: 16-pixel patches, an 8×8 learned position table, DeepStack after blocks :data:`DEEPSTACK`);
    its q and k (the fused ``qkv``'s first two thirds) multiplied by ``sharpen`` so the tower prunes before its last
    layer. Text: 2 layers, width 128, 2 query and 1 key/value heads (Qwen3-VL: interleaved M-RoPE). The vision
    tokens are suppressed in generation. Qwen3-VL's processor is saved with its video processor (vLLM loads it),
    which needs torchvision (vLLM's environment has it).
    """
    import transformers
    from transformers import Qwen2VLVideoProcessor

    if arch == "qwen3_vl":
        return _save_qwen3_vl(folder, seed, sharpen)

    torch.manual_seed(seed)
    vision = dict(depth=4, embed_dim=160, num_heads=2, in_channels=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    if arch == "qwen2_vl":
        vision.update(hidden_size=128, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(vision_config=vision, **_text())
        model_cls, processor_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor
    else:
        vision.pop("embed_dim")
        vision.update(hidden_size=160, intermediate_size=128, out_hidden_size=128, window_size=112,
                      fullatt_block_indexes=[2], hidden_act="silu")
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, **_text())
        model_cls, processor_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLProcessor
    _save(folder, model_cls, config, sharpen)
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    processor_cls(image_processor=image_processor, tokenizer=tiny_qwen_tokenizer(),
                  video_processor=video_processor).save_pretrained(folder)
    return folder


def _save(folder: str, model_cls, config, sharpen: float) -> None:
    """The seeded model of ``config`` with its tower's q and k sharpened, greedy, never emitting a vision token."""
    model = model_cls._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[: 2 * width].mul_(sharpen)
            block.attn.qkv.bias[: 2 * width].mul_(sharpen)
        if hasattr(model.model.visual, "pos_embed"):  # Qwen3-VL: a visible learned position table
            model.model.visual.pos_embed.weight.normal_(0.0, 1.0)
    model.generation_config.do_sample = False
    model.generation_config.suppress_tokens = list(range(len(TINY_WORDS), len(QWEN_WORDS)))
    model.save_pretrained(folder)


def _save_qwen3_vl(folder: str, seed: int, sharpen: float) -> str:
    import transformers

    torch.manual_seed(seed)
    text = _text()
    text["text_config"].update(head_dim=64, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12], "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=160, num_heads=2, intermediate_size=128, in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                  deepstack_visual_indexes=DEEPSTACK, hidden_act="gelu_pytorch_tanh")
    config = transformers.Qwen3VLConfig(vision_config=vision, **text)
    _save(folder, transformers.Qwen3VLForConditionalGeneration, config, sharpen)
    size = {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 64}
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                         size=size)
    video_processor = transformers.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                         size=size)
    transformers.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tiny_qwen_tokenizer(),
                                  video_processor=video_processor).save_pretrained(folder)
    return folder


def prompt(words: str = "w1 w2") -> str:
    """A text prompt with one image: ``<|vision_start|><|image_pad|><|vision_end|>`` then ``words``."""
    return f"w5 <|vision_start|><|image_pad|><|vision_end|> {words}"


def image(width: int, height: int, seed: int = 0):
    """A seeded random RGB PIL image."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())

"""Tiny seeded Qwen3-VL models and their processor, built offline from configs (tests only)."""
import torch

from .qwen import seeded_qwen, tiny_qwen2_vl_processor
from .text import QWEN_WORDS, image_only

#: The tower layers whose DeepStack features the tiny model adds to decoder layers 0, 1 and 2 (before and after both
#: of its tower prunes, and after the stage's prune at decoder layer 1).
DEEPSTACK = [0, 1, 2]


def random_qwen3_vl(*, seed=0, sharpen=4.0, dtype=torch.float32, device="cpu", attn_implementation="sdpa", depth=4,
                    moe=False):
    """A seeded random ``Qwen3VLForConditionalGeneration`` for ``tiny.text.tiny_qwen_tokenizer``, in eval mode.

    Vision: ``depth`` blocks, width 32, 4 heads, 2-pixel patches, 2×2 merge, a 4×4 learned position table, DeepStack
    at tower layers :data:`DEEPSTACK`; text: 4 layers (DeepStack adds to 0 … 2, so layer 3 sees layer 2's), width 32,
    4 query and 2 key/value heads of 8, interleaved M-RoPE sections (2, 1, 1). The tower's q and k are multiplied by
    ``sharpen``; greedy, never emits a vision token. ``moe``: a ``Qwen3VLMoeForConditionalGeneration`` (the same
    tower; 4 experts of width 32, 2 per token, in every decoder layer).
    """
    import transformers

    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}
    config = getattr(transformers, prefix + "Config")(
        vision_config=dict(
            depth=depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=32, num_position_embeddings=16,
            deepstack_visual_indexes=DEEPSTACK,
        ),
        text_config=dict(
            vocab_size=len(QWEN_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
            pad_token_id=0, bos_token_id=2, eos_token_id=3, **experts,
        ),
        image_token_id=QWEN_WORDS.index("<|image_pad|>"),
        video_token_id=QWEN_WORDS.index("<|video_pad|>"),
        vision_start_token_id=QWEN_WORDS.index("<|vision_start|>"),
        vision_end_token_id=QWEN_WORDS.index("<|vision_end|>"),
    )
    model = seeded_qwen(getattr(transformers, prefix + "ForConditionalGeneration"), config, seed, sharpen,
                        torch.float32, device, attn_implementation)
    with torch.no_grad():  # visible position embeddings and DeepStack features (default init is small)
        visual = model.model.visual
        visual.pos_embed.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def tiny_qwen3_vl_processor(tokenizer=None):
    """A ``Qwen3VLProcessor`` for :func:`random_qwen3_vl`: the tokenizer and image processor of
    :func:`tiny_qwen2_vl_processor` (2-pixel patches, 2×2 merge); stock, but without a video processor (whose class
    needs torchvision): images and text only. Needs Pillow."""
    from transformers import Qwen3VLProcessor

    base = tiny_qwen2_vl_processor(tokenizer)
    return image_only(Qwen3VLProcessor)(image_processor=base.image_processor, tokenizer=base.tokenizer)


def random_qwen3_5(*, seed=0, sharpen=4.0, dtype=torch.float32, device="cpu", attn_implementation="sdpa", depth=4):
    """A seeded random ``Qwen3_5ForConditionalGeneration`` (transformers releases that have it) for
    ``tiny.text.tiny_qwen_tokenizer``, in eval mode: :func:`random_qwen3_vl`'s tower without DeepStack; a hybrid text
    model of 4 layers (linear, linear, linear, full attention), width 32, 4 query and 2 key/value heads of 8, linear
    attention with 2 key and 4 value heads of 8, interleaved M-RoPE sections (2, 1, 1)."""
    import transformers

    config = transformers.Qwen3_5Config(
        vision_config=dict(
            depth=depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=32, num_position_embeddings=16,
        ),
        text_config=dict(
            vocab_size=len(QWEN_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True},
            pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        image_token_id=QWEN_WORDS.index("<|image_pad|>"),
        video_token_id=QWEN_WORDS.index("<|video_pad|>"),
        vision_start_token_id=QWEN_WORDS.index("<|vision_start|>"),
        vision_end_token_id=QWEN_WORDS.index("<|vision_end|>"),
    )
    model = seeded_qwen(transformers.Qwen3_5ForConditionalGeneration, config, seed, sharpen, torch.float32, device,
                        attn_implementation)
    with torch.no_grad():
        model.model.visual.pos_embed.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()

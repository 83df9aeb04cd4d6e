"""LLaVA-NeXT, Qwen2-VL, Gemma 3, LLaVA-OneVision, ViT, DINOv2 and InternVL presets of
:mod:`flowcut_kernels.bench`: whole HF models, or their vision towers.

Each preset is a :class:`Scenario`; built, it gives the same zero-argument methods as :mod:`.presets` (each
returning a :class:`~.presets.MethodResult`), timed, tabled and plotted by the same machinery. Random seeded
weights built directly on the device in the target dtype; the CLIP towers' q/k are sharpened
(``--sharpen``, default 16), and so are the SigLIP, ViT and DINOv2 towers' (default 16, 8 on the tiny SigLIP ones) and
Qwen2-VL's (the fused ``qkv``'s q and k thirds, default 8 at the 7B shapes, 4 on the tiny ones).

- ``llava-next-7b`` (CUDA): ``LlavaNextForConditionalGeneration`` — CLIP-L/336 tower, projector, Vicuna-7B-shaped
  decoder; LLaVA-NeXT's default ``image_grid_pinpoints``; each image 672×672 (a base crop + a 2×2 grid: 5 crops,
  5·576 = 2880 patches; the stock packing adds 48 newline tokens: 2928 visual tokens) in a 60-token prompt (image
  after 35). ``unpruned``: the stock forward; ``flowcut-<backend>``: ``flowcut(model, K, backend=...)`` (the
  LLaVA-NeXT recipe: tower stage ⌊K/2⌋ per crop, language-model stage to K), the prompt holding K placeholders.
  Both: ``input_ids`` + ``pixel_values`` + ``image_sizes``, ``use_cache=True``, last-position logits (one prefill).
- ``llava-next-crops`` (CPU or CUDA): the tower part alone, per image its 5 crops: the stock CLIP forward on the
  crops (``output_hidden_states``, all layers, ``hidden_states[-2]``) against FlowCut's crop pass (the crops of an
  image on one shared schedule, ⌊K/2⌋ patches each, all images in one pass, layers 0…F; no projector, no layout).
- ``qwen2-vl-tower`` (CPU or CUDA): the Qwen2-VL-7B vision tower (32 layers × 1280, 16 heads, 14-px patches, 2×2
  merge) on a 448×448 image (1024 patches, 256 merged tokens): the stock tower + merger against the FlowCut tower
  stage (whole merge groups, :func:`flowcut_kernels.models.qwen2_vl.pruned_tower`) + the merger.
- ``qwen2-vl-video-tower`` (CUDA; a CPU takes minutes a call): the same tower on a 16-frame 448×448 video (t = 8
  temporal patches of 1024 patches, 2048 merged tokens): the stock tower (attending within each frame) against
  FlowCut's video rule, K per video spread evenly over its 8 frames, each frame pruned as an image, all frames in one
  pass (:func:`flowcut_kernels.models.qwen2_vl.pruned_media`).
- ``qwen3-vl-tower`` (CPU or CUDA): the Qwen3-VL-8B vision tower (27 layers × 1152, 16 heads, 16-px patches, 2×2
  merge, learned 48×48 position table, DeepStack after layers 8, 16, 24) on a 448×448 image (784 patches, 196 merged
  tokens): the stock tower (merger and DeepStack mergers) against the FlowCut tower stage (the DeepStack features of
  the kept groups included) + the merger.
- ``gemma3-tower`` (CPU or CUDA): Gemma 3's vision path, ``Gemma3Model.get_image_features``: the SigLIP So400m tower
  (27 layers × 1152, 16 heads, intermediate 4304, 14-px patches) on an 896×896 image (64×64 = 4096 patches), the
  post-layernorm and the projector (4×4 average pooling to 256 tokens, its norm and its projection to Gemma 3 4B's
  width 2560; the model around it a one-layer stand-in decoder, never run): the stock method against the method
  after ``flowcut(model, K)`` (whole pooling windows, K of the 256 tokens, :mod:`flowcut_kernels.models.gemma3`).
  All 27 layers also on a CPU: there one stock forward took about 30 s (2 shared cores).
- ``llava-onevision-tower`` (CPU or CUDA): LLaVA-OneVision's tower part, as ``llava-next-crops`` for NeXT: the SigLIP
  So400m tower at 384×384 (27 layers × 1152, 14-px patches, 729 patches a crop, no CLS) on one 768×768 image's 5
  anyres crops (OneVision's default ``image_grid_pinpoints``: the base crop + a 2×2 grid, 5·729 = 3645 patches): the
  stock tower (all layers, ``hidden_states[-1]``, every patch: OneVision's ``full`` strategy) against FlowCut's crop
  pass (the crops of an image on one shared schedule, the mean-query variant, ⌊K/2⌋ patches each; no projector, no
  layout).
- ``internvl-tower`` (CPU or CUDA): InternVL's vision path, ``InternVLModel.get_image_features``: the InternViT-300M
  tower (24 layers × 1024, 16 heads, 14-px patches, a CLS row) on 448×448 tiles (32×32 = 1024 patches), the pixel
  shuffle (2×2 into 256 tokens) and the projector (to InternVL3-1B's width 896; the model around it a one-layer
  stand-in decoder, never run), each tile an image: the stock method against the method after ``flowcut(model, K)``
  (whole pixel-shuffle groups, K of the 256 tokens, :mod:`flowcut_kernels.models.internvl`).
- ``vit-tower`` / ``dinov2-tower`` (CPU or CUDA): ``ViTModel`` at ViT-B/16 (12 layers × 768, 12 heads, 224×224: 196
  patches + CLS) and ``Dinov2WithRegistersModel`` at DINOv2-L/14 with 4 registers (24 layers × 1024, 16 heads, 224×224:
  256 patches + CLS + 4 registers, never pruned): the stock last layer's patches (``hidden_states[-1]``) against
  ``encode(model, pixels, K)`` (:func:`flowcut_kernels.encode`, the CLS variant); their CLS and registers random.
- ``qwen2-vl-7b`` (CUDA): ``Qwen2VLForConditionalGeneration`` at the 7B shapes (the tower above; LLM 28 layers ×
  3584, GQA 28/4, intermediate 18944, vocabulary 152064, M-RoPE 16/24/24) on a 1288×1288 image (92×92 patches,
  2116 merged tokens) in a 60-token prompt: the stock forward against ``flowcut(model, K)`` (tower stage).
- ``qwen2-vl-2b-cpu`` (CPU or CUDA): the same at Qwen2-VL-2B's shapes (the tower above; LLM 28 layers × 1536, GQA
  12/2, intermediate 8960, vocabulary 151936) on a 336×336 image (24×24 patches, 144 merged tokens), K = 64 and 128:
  the end-to-end prefill a CPU runs in seconds. Its rows carry the FLOP-limit speed-up (:func:`qwen_prefill_flops`).
- ``gemma3-4b`` (CUDA): ``Gemma3ForConditionalGeneration`` at Gemma 3 4B's shapes (the ``gemma3-tower`` tower and
  projector: an 896×896 image, 4096 patches, 256 soft tokens; LLM 34 layers × 2560, GQA 8/4, head_dim 256, 5
  sliding-window layers to 1 global, vocabulary 262208) in a 60-token prompt (begin-of-image, the soft tokens,
  end-of-image after 35; ``token_type_ids`` 1 at the soft tokens, as the processor's): the stock forward against
  ``flowcut(model, K)`` (whole pooling windows, K soft tokens).
- ``llava-onevision-7b`` (CUDA): ``LlavaOnevisionForConditionalGeneration`` at 7B shapes (the ``llava-onevision-tower``
  tower on one 768×768 image's 5 anyres crops, 3645 patches; the stock packing gives 3699 tokens: 729 base, 2916
  grid, 54 newlines; a Qwen2-7B-shaped LLM: 28 layers × 3584, GQA 28/4, intermediate 18944, vocabulary 152064) in a
  60-token prompt: the stock forward against ``flowcut(model, K)`` (⌊K/2⌋ per crop, the language-model stage to K).
- ``internvl3-8b`` (CUDA): ``InternVLForConditionalGeneration`` at InternVL3-8B's shapes (the ``internvl-tower``
  tower, pixel shuffle and projector on one 896×896 image cropped as InternVL's image processor does: a 2×2 grid of
  448×448 tiles + a thumbnail, 5 tiles of 256 tokens, 1280 unpruned; a Qwen2.5-7B-shaped LLM: 28 layers × 3584, GQA
  28/4, intermediate 18944, vocabulary 151674, its own ``lm_head``: 7.94 B weights) in a 60-token prompt
  (``<img>``, the image-context tokens, ``</img>`` after 35): the stock forward against ``flowcut(model, K)`` (K ≥ 5:
  ⌊K/5⌋ whole pixel-shuffle groups per tile, one more for the last K mod 5 tiles), the patched call also given
  ``image_num_patches`` (the tiles of each image, as the processor patched by ``flowcut`` adds it on transformers
  5.25).
  Both: ``input_ids`` + pixels (+ ``image_sizes``), ``use_cache=True``, last-position logits (one prefill).
- ``…-tiny`` variants: the same code at tiny sizes, for the tests (they run on a CPU).

The FlowCut methods of the whole-model presets patch the model before each call and remove the patch after it
(a few attribute assignments and argument checks, microseconds), so one model serves every method.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..models.registry import find_tower
from . import random_models
from .presets import TINY_LM, VICUNA_7B, MethodResult, random_prompt, weights_mb

#: LLaVA-NeXT's default anyres resolutions (336-px crops).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
#: The image placeholder id of the LLaVA-NeXT presets (random prompts use ids 3 and up).
IMAGE_TOKEN = 0

#: Qwen2-VL-7B's vision tower and language model.
QWEN_VISION_7B = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN_IDS_7B = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
#: Qwen2-VL-2B's vision tower and language model (its ids are the 7B's).
QWEN_VISION_2B = dict(QWEN_VISION_7B, hidden_size=1536)
QWEN_TEXT_2B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    tie_word_embeddings=True)
#: Qwen3-VL-8B's vision tower (out_hidden_size: its language model's width).
QWEN3_VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=4096,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
QWEN3_VISION_TINY = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2,
                         spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=32,
                         num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2])
QWEN_VISION_TINY = dict(depth=4, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                        spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN_TEXT_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
QWEN_IDS_TINY = dict(image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)

#: SigLIP So400m (Gemma 3's tower at 896 px, LLaVA-OneVision's at 384 px), and tiny SigLIP towers for tests.
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
              vision_use_head=False)
SIGLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, patch_size=4,
                   vision_use_head=False)
#: ViT-B/16 and DINOv2-L/14 (with registers) at 224 px, and tiny ones for tests (32 px, 4-px patches).
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
               patch_size=16)
DINOV2_L14 = dict(hidden_size=1024, mlp_ratio=4, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                  patch_size=14, num_register_tokens=4)
VIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=32,
                patch_size=4)
DINOV2_TINY = dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=6, num_attention_heads=4, image_size=32, patch_size=4,
                   num_register_tokens=4)
#: InternViT-300M (InternVL 2.5/3 1B–8B) at 448² tiles, and InternVL's layout (downsample 0.5; InternVL3-1B's width).
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, attention_bias=True)
INTERNVIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=64,
                      patch_size=4, attention_bias=True)
INTERNVL3_1B = dict(text_hidden=896)
INTERNVL_TINY = dict(text_hidden=32)
#: Gemma 3's image-token layout (4B's text width; the stand-in decoder's ids within its 64-word vocabulary).
GEMMA3_4B = dict(mm_tokens_per_image=256, text_hidden=2560)
GEMMA3_TINY = dict(mm_tokens_per_image=64, text_hidden=32)

#: Gemma 3 4B's decoder (5 sliding-window layers to 1 global one) and its image-token ids; a tiny one for tests.
GEMMA3_TEXT_4B = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=1024, max_position_embeddings=131072, rope_theta=1e6, rope_local_base_freq=1e4)
GEMMA3_IDS_4B = dict(boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)
GEMMA3_TEXT_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                        sliding_window=64, max_position_embeddings=1024,
                        layer_types=["sliding_attention", "full_attention"])
GEMMA3_IDS_TINY = dict(boi_token_index=61, eoi_token_index=62, image_token_index=63)
#: LLaVA-OneVision-7B's Qwen2-7B-shaped decoder and its image/video ids; a tiny one for tests.
ONEVISION_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, rope_theta=1e6)
ONEVISION_IDS_7B = dict(image_token_index=151646, video_token_index=151647)
ONEVISION_TEXT_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
ONEVISION_IDS_TINY = dict(image_token_index=62, video_token_index=63)
#: InternVL3-8B's Qwen2.5-7B-shaped decoder (OneVision's Qwen2-7B shape, InternVL3's vocabulary) and its ``<img>``,
#: ``</img>`` and image-context ids; a tiny one for tests.
INTERNVL3_TEXT_8B = dict(ONEVISION_TEXT_7B, vocab_size=151674)
INTERNVL3_IDS_8B = dict(start_image_token_id=151665, end_image_token_id=151666, image_token_id=151667)
INTERNVL_IDS_TINY = dict(start_image_token_id=61, end_image_token_id=62, image_token_id=63)

SCENARIO_FAMILIES = ("unpruned", "flowcut")
#: q/k factor of the Qwen2-VL-7B-shaped random towers: at 448×448, target 64 the schedule then prunes
#: progressively (1024 → 932 → 840 → … → 276 patches before the last prune to 256), as on a trained tower; 4 keeps
#: 428 until the end. The tiny towers use 4 (as the tests' tiny Qwen2-VL).
QWEN_SHARPEN = 8.0


#: What K counts, by scenario kind (default: merged tokens).
TARGET_WORDS = {"next": "K (the LLaVA-NeXT target_num: ⌊K/2⌋ per crop)",
                "next-crops": "K (the LLaVA-NeXT target_num: ⌊K/2⌋ per crop)",
                "onevision-crops": "K (the LLaVA-OneVision target_num: ⌊K/2⌋ per crop)",
                "gemma3-tower": "K (pooling windows kept per image)", "gemma3": "K (pooling windows kept per image)",
                "onevision": "K (the LLaVA-OneVision target_num: ⌊K/2⌋ per crop, the LM stage to K)",
                "qwen-tower": "K (merged tokens kept per image, or per video: at least 1 a frame)",
                "vit-tower": "K (patches kept per image)",
                "dinov2-tower": "K (patches kept per image)",
                "internvl-tower": "K (pixel-shuffle groups kept per tile)",
                "internvl": "K (tokens kept per image: K/n whole pixel-shuffle groups from each of its n tiles, at "
                            "least 1 a tile)"}


@dataclass(frozen=True)
class Scenario:
    """A LLaVA-NeXT or Qwen2-VL preset (module docstring).

    kind: "next" (whole LLaVA-NeXT), "next-crops" (its tower on crops), "qwen" (whole Qwen2-VL), "qwen-tower",
        "qwen3-tower" (Qwen3-VL's), "gemma3-tower", "gemma3" (whole Gemma 3), "onevision-crops", "onevision" (whole
        LLaVA-OneVision), "vit-tower", "dinov2-tower", "internvl-tower", "internvl" (whole InternVL).
    tower: a CLIP shape of :data:`.random_models.PRESETS` (LLaVA-NeXT), or the tower's config fields.
    lm: LlamaConfig / Qwen2-VL text fields (whole models; Gemma 3, InternVL: their token layout, or the decoder's
    fields under "text"). image: (H, W) pixels of each image (LLaVA-NeXT, LLaVA-OneVision, whole InternVL), or (h, w)
    patches (the others). max_target: the largest K. frames: the temporal patches t of a Qwen tower's input (1: an
    image; more: a video of 2t frames, K tokens per video).
    """

    name: str
    kind: str
    description: str
    tower: str | dict
    image: tuple[int, int]
    max_target: int
    default_targets: tuple[int, ...]
    default_batch: tuple[int, ...] = (1,)
    lm: dict | None = None
    ids: dict | None = None
    pinpoints: list | None = None
    prompt_tokens: int = 60
    image_position: int = 35
    sharpen: float = random_models.DEFAULT_SHARPEN
    cuda_only: str | None = None
    families: tuple[str, ...] = SCENARIO_FAMILIES
    min_target: int = 1
    frames: int = 1

    def default_methods(self, device: torch.device) -> list[str]:
        return list(self.families)

    def check_target(self, target: int) -> str | None:
        """Why ``target`` cannot be measured, or None."""
        if not self.min_target <= target <= self.max_target:
            what = TARGET_WORDS.get(self.kind, "K (merged tokens kept per image)")
            return (f"--target {target} is out of range for --preset {self.name}: {what} must be in "
                    f"[{self.min_target}, {self.max_target}]")
        return None

    def build(self, device: torch.device, dtype: torch.dtype, seed: int, sharpen: float) -> "BuiltScenario":
        return BUILDERS[self.kind](self, torch.device(device), dtype, seed, sharpen)


COLD = "{} needs {} GB in float16 and minutes per prefill on a CPU; run it on a CUDA GPU, or use --preset {} on a CPU"
SCENARIOS = {s.name: s for s in [
    Scenario("llava-next-7b", "next", "LLaVA-NeXT-7B prefill: CLIP-L/336 on 5 crops + projector + Vicuna-7B-shaped "
             "LM, 2880-patch image (2928 tokens unpruned) vs FlowCut K=32/64/128/160 (with the LM stage), B=1, 8 "
             "(CUDA only)", "clip-l-336", (672, 672), 1151, (32, 64, 128, 160), (1, 8), lm=VICUNA_7B,
             pinpoints=NEXT_PINPOINTS, cuda_only=COLD.format("LLaVA-NeXT-7B", 14, "llava-next-crops"), min_target=2),
    Scenario("llava-next-tiny", "next", "llava-next-7b at tiny sizes (5 crops of 32 px, 2-layer LM), for tests",
             "tiny", (64, 64), 127, (16,), (1,), lm=TINY_LM, pinpoints=random_models.TINY_PINPOINTS,
             prompt_tokens=12, image_position=7, min_target=2),
    Scenario("llava-next-crops", "next-crops", "LLaVA-NeXT's tower on one image's 5 CLIP-L/336 crops: unpruned vs "
             "FlowCut's per-image shared-schedule crop pass (K/2 per crop)", "clip-l-336", (672, 672), 1151, (64,),
             min_target=2),
    Scenario("llava-next-crops-tiny", "next-crops", "llava-next-crops on the tiny tower, for tests", "tiny",
             (64, 64), 127, (16,), min_target=2),
    Scenario("qwen2-vl-tower", "qwen-tower", "Qwen2-VL-7B vision tower (32 layers x 1280) on a 448x448 image (1024 "
             "patches, 256 merged tokens): unpruned vs the FlowCut tower stage", QWEN_VISION_7B, (32, 32), 255,
             (64,), sharpen=QWEN_SHARPEN),
    Scenario("qwen2-vl-tower-tiny", "qwen-tower", "qwen2-vl-tower at tiny sizes, for tests", QWEN_VISION_TINY,
             (16, 16), 63, (16,), sharpen=4.0),
    Scenario("qwen2-vl-video-tower", "qwen-tower", "Qwen2-VL-7B vision tower (32 layers x 1280) on a 16-frame 448x448 "
             "video (8 temporal patches x 1024 patches, 2048 merged tokens): unpruned vs the FlowCut tower stage, K "
             "per video spread over its frames (minutes per call on a CPU)", QWEN_VISION_7B, (32, 32), 2047, (256,),
             sharpen=QWEN_SHARPEN, min_target=8, frames=8),
    Scenario("qwen2-vl-video-tower-tiny", "qwen-tower", "qwen2-vl-video-tower at tiny sizes (8 frames), for tests",
             QWEN_VISION_TINY, (16, 16), 255, (16,), sharpen=4.0, min_target=4, frames=4),
    Scenario("qwen3-vl-tower", "qwen3-tower", "Qwen3-VL-8B vision tower (27 layers x 1152, DeepStack) on a 448x448 "
             "image (784 patches, 196 merged tokens): unpruned vs the FlowCut tower stage", QWEN3_VISION_8B, (28, 28),
             195, (64,), sharpen=QWEN_SHARPEN),
    Scenario("qwen3-vl-tower-tiny", "qwen3-tower", "qwen3-vl-tower at tiny sizes, for tests", QWEN3_VISION_TINY,
             (16, 16), 63, (16,), sharpen=4.0),
    Scenario("gemma3-tower", "gemma3-tower", "Gemma 3's SigLIP So400m tower (27 layers x 1152) on an 896x896 image "
             "(4096 patches) + its projector (4x4 average pooling to 256 tokens): unpruned vs flowcut(model, K) (whole "
             "pooling windows)", dict(SO400M, image_size=896), (64, 64), 255, (64,), lm=GEMMA3_4B),
    Scenario("gemma3-tower-tiny", "gemma3-tower", "gemma3-tower at tiny sizes (16x16 patches pooled 2x2 into 64 "
             "tokens), for tests", dict(SIGLIP_TINY, image_size=64), (16, 16), 63, (16,), lm=GEMMA3_TINY,
             sharpen=8.0),
    Scenario("internvl-tower", "internvl-tower", "InternVL's InternViT-300M tower (24 layers x 1024) on 448x448 "
             "tiles (1024 patches + CLS) + pixel shuffle (2x2 into 256 tokens) + projector: unpruned vs flowcut(model, "
             "K) (whole pixel-shuffle groups)", INTERNVIT_300M, (32, 32), 255, (64,), lm=INTERNVL3_1B),
    Scenario("internvl-tower-tiny", "internvl-tower", "internvl-tower at tiny sizes (16x16 patches shuffled 2x2 into "
             "64 tokens), for tests", INTERNVIT_TINY, (16, 16), 63, (16,), lm=INTERNVL_TINY, sharpen=8.0),
    Scenario("llava-onevision-tower", "onevision-crops", "LLaVA-OneVision's SigLIP So400m tower (27 layers x 1152, 729 "
             "patches a crop) on one 768x768 image's 5 anyres crops (3645 patches): unpruned vs FlowCut's per-image "
             "shared-schedule crop pass (K/2 per crop)", dict(SO400M, image_size=384), (768, 768), 1457, (64,),
             min_target=2),
    Scenario("llava-onevision-tower-tiny", "onevision-crops", "llava-onevision-tower on a tiny SigLIP tower (5 crops "
             "of 32 px), for tests", dict(SIGLIP_TINY, image_size=32), (64, 64), 127, (16,),
             pinpoints=random_models.TINY_PINPOINTS, min_target=2, sharpen=8.0),
    Scenario("vit-tower", "vit-tower", "ViT-B/16 (12 layers x 768) at 224x224 (196 patches + CLS): unpruned vs "
             "encode(model, pixels, K)", VIT_B16, (14, 14), 195, (64,)),
    Scenario("vit-tower-tiny", "vit-tower", "vit-tower at tiny sizes, for tests", VIT_TINY, (8, 8), 63, (16,)),
    Scenario("dinov2-tower", "dinov2-tower", "DINOv2-L/14 with 4 registers (24 layers x 1024) at 224x224 (256 patches "
             "+ CLS + 4 registers, never pruned): unpruned vs encode(model, pixels, K)", DINOV2_L14, (16, 16), 255,
             (64,)),
    Scenario("dinov2-tower-tiny", "dinov2-tower", "dinov2-tower at tiny sizes, for tests", DINOV2_TINY, (8, 8), 63,
             (16,)),
    Scenario("gemma3-4b", "gemma3", "Gemma 3 4B prefill (SigLIP So400m 27x1152 at 896x896, 4096 patches pooled to 256 "
             "tokens; LLM 34x2560, GQA 8/4, 5:1 sliding/global) vs flowcut(model, K) (whole pooling windows) (CUDA "
             "only)", dict(SO400M, image_size=896), (64, 64), 255, (32, 64, 128), (1, 8),
             lm=dict(GEMMA3_4B, text=GEMMA3_TEXT_4B), ids=GEMMA3_IDS_4B,
             cuda_only=COLD.format("Gemma 3 4B", 9, "gemma3-tower")),
    Scenario("gemma3-tiny", "gemma3", "gemma3-4b at tiny sizes (16x16 patches pooled 2x2 into 64 tokens, 2-layer LM), "
             "for tests", dict(SIGLIP_TINY, image_size=64), (16, 16), 63, (16,),
             lm=dict(GEMMA3_TINY, text=GEMMA3_TEXT_TINY), ids=GEMMA3_IDS_TINY, prompt_tokens=12, image_position=7,
             sharpen=8.0),
    Scenario("llava-onevision-7b", "onevision", "LLaVA-OneVision-7B prefill (SigLIP So400m 27x1152 at 384x384 on one "
             "768x768 image's 5 anyres crops, 3699 tokens unpruned; Qwen2-7B-shaped LLM 28x3584, GQA 28/4) vs "
             "flowcut(model, K) (K/2 per crop, the LM stage to K) (CUDA only)", dict(SO400M, image_size=384),
             (768, 768), 364, (32, 64, 128, 160), (1, 8), lm=ONEVISION_TEXT_7B, ids=ONEVISION_IDS_7B,
             cuda_only=COLD.format("LLaVA-OneVision-7B", 16, "llava-onevision-tower"), min_target=2),
    Scenario("llava-onevision-tiny", "onevision", "llava-onevision-7b at tiny sizes (5 crops of 32 px, 2-layer LM), "
             "for tests", dict(SIGLIP_TINY, image_size=32), (64, 64), 31, (16,), lm=ONEVISION_TEXT_TINY,
             ids=ONEVISION_IDS_TINY, pinpoints=random_models.TINY_PINPOINTS, prompt_tokens=12, image_position=7,
             min_target=2, sharpen=8.0),
    Scenario("internvl3-8b", "internvl", "InternVL3-8B prefill (InternViT-300M 24x1024 on an 896x896 image's 5 "
             "448x448 tiles: a 2x2 grid + thumbnail, 1280 tokens unpruned; Qwen2.5-7B-shaped LLM 28x3584, GQA 28/4) vs "
             "flowcut(model, K) (K/5 whole pixel-shuffle groups per tile) (CUDA only)", INTERNVIT_300M, (896, 896),
             1279, (64, 128, 256), (1, 8), lm=dict(text=INTERNVL3_TEXT_8B), ids=INTERNVL3_IDS_8B,
             cuda_only=COLD.format("InternVL3-8B", 16, "internvl-tower"), min_target=5),
    Scenario("internvl3-8b-tiny", "internvl", "internvl3-8b at tiny sizes (a 128x128 image's 5 tiles of 16x16 "
             "patches shuffled 2x2 into 64 tokens, 2-layer LM), for tests", INTERNVIT_TINY, (128, 128), 319, (16,),
             lm=dict(text=ONEVISION_TEXT_TINY), ids=INTERNVL_IDS_TINY, prompt_tokens=12, image_position=7,
             min_target=5, sharpen=8.0),
    Scenario("qwen2-vl-7b", "qwen", "Qwen2-VL-7B prefill (ViT 32x1280, LLM 28x3584, GQA 28/4) on a 1288x1288 image "
             "(2116 merged tokens) vs FlowCut's tower stage (CUDA only)", QWEN_VISION_7B, (92, 92), 2115,
             (64, 128, 256, 512), (1, 8), lm=QWEN_TEXT_7B, ids=QWEN_IDS_7B, sharpen=QWEN_SHARPEN,
             cuda_only=COLD.format("Qwen2-VL-7B", 17, "qwen2-vl-tower")),
    Scenario("qwen2-vl-2b-cpu", "qwen", "Qwen2-VL-2B prefill (ViT 32x1280, LLM 28x1536, GQA 12/2) on a 336x336 image "
             "(576 patches, 144 merged tokens) vs flowcut(model, K) (tower stage, then the LM stage) at K=64/128: a "
             "whole real-shaped VLM a CPU runs in seconds", QWEN_VISION_2B, (24, 24), 143, (64, 128), lm=QWEN_TEXT_2B,
             ids=QWEN_IDS_7B, sharpen=QWEN_SHARPEN),
    Scenario("qwen2-vl-tiny", "qwen", "qwen2-vl-7b at tiny sizes, for tests", QWEN_VISION_TINY, (16, 16), 63, (16,),
             lm=QWEN_TEXT_TINY, ids=QWEN_IDS_TINY, prompt_tokens=12, image_position=7, sharpen=4.0),
]}


@dataclass
class BuiltScenario:
    """A built scenario: ``methods(batch, target, backends, include)`` gives name → zero-argument method."""

    name: str
    weights_mb: float
    make_methods: Callable[..., dict]
    model: nn.Module
    extras: dict = field(default_factory=dict)

    def methods(self, batch: int, target: int, backends: list[str], include: set[str], seed: int) -> dict:
        return self.make_methods(batch, target, backends, include, seed)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def next_config(s: Scenario):
    """The ``LlavaNextConfig`` of a ``next`` scenario."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**random_models.vision_fields(s.tower)), text_config=LlamaConfig(**s.lm),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=s.pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def qwen_config(s: Scenario):
    """The ``Qwen2VLConfig`` of a ``qwen`` scenario (the vision config alone for ``qwen-tower``)."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    if s.lm is None:
        return Qwen2VLVisionConfig(**s.tower)
    text = dict(s.lm, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # within every vocabulary
    return Qwen2VLConfig(vision_config=dict(s.tower), text_config=text, **s.ids)


def _prompt(s: Scenario, image: list[int], device, seed: int, vocab: int, batch: int) -> Tensor:
    """(batch, P + len(image)) the seeded text with ``image`` ids inserted after ``image_position`` tokens."""
    text = random_prompt(s.prompt_tokens, vocab, device, seed)
    if s.ids is not None:  # keep Qwen's vision ids out of the text
        text = text % min(s.ids.values())
        text = text.clamp(min=3)
    pos = s.image_position
    ids = torch.cat([text[:, :pos], torch.tensor([image], device=device), text[:, pos:]], dim=1)
    return ids.expand(batch, -1).contiguous()


class _Patched:
    """``with _Patched(model, K, backend):`` the model runs FlowCut inside the block, stock after it."""

    def __init__(self, model, target, backend):
        self.args = (model, target, backend)

    def __enter__(self):
        from .. import flowcut

        model, target, backend = self.args
        flowcut(model, target, backend=backend)

    def __exit__(self, *exc):
        from .. import remove_flowcut

        remove_flowcut(self.args[0])


def _prefill_methods(s: Scenario, model: nn.Module, device, image_ids: Callable[[int], list[int]], inputs,
                     call: Callable[..., object], stock_tokens: list[int],
                     patched_inputs: Callable[[int], dict] = lambda batch: {}):
    """``make(batch, target, backends, include, seed)`` of a whole-VLM prefill preset (one image per prompt).

    image_ids(count): a prompt's image ids for ``count`` visual tokens. inputs(batch, seed): (the image inputs of
    ``call``, the visual tokens the stock model gives an image), cached by the builder. call(ids, **image_inputs): the
    prefill's output (``use_cache=True``, last-position logits). stock_tokens: the tokens each stock tower layer
    processes per crop. patched_inputs(batch): the image inputs only the patched model takes (InternVL's
    ``image_num_patches``). ``unpruned`` is the stock forward with the stock count of placeholders;
    ``flowcut-<backend>`` the forward after ``flowcut(model, K, backend=...)`` with K of them (its tower schedule read
    once beforehand from the patched ``get_image_features``)."""
    vocab = model.config.get_text_config().vocab_size

    def make(batch, target, backends, include, seed):
        image, stock_count = inputs(batch, seed)
        patched = dict(image, **patched_inputs(batch))
        found = {}
        if "unpruned" in include:
            ids = _prompt(s, image_ids(stock_count), device, seed, vocab, batch)

            def unpruned(ids=ids):
                return MethodResult(call(ids, **image).logits, None, stock_tokens, stock_count, ids.shape[1])

            found["unpruned"] = unpruned
        if "flowcut" in include:
            ids = _prompt(s, image_ids(target), device, seed, vocab, batch)
            for backend in backends:
                with _Patched(model, target, backend), torch.inference_mode():
                    out = model.model.get_image_features(**patched, return_dict=True)
                tokens = out.tokens_per_layer[0]

                def run(backend=backend, tokens=tokens, ids=ids):
                    with _Patched(model, target, backend):
                        logits = call(ids, **patched).logits
                    return MethodResult(logits, None, tokens, target, ids.shape[1])

                found[f"flowcut-{backend}"] = run
        return found

    return make


def _stock_count(model: nn.Module, image: dict, crops: int = 1) -> int:
    """The visual tokens the stock ``get_image_features`` gives the first image of ``image`` (its inputs): its first
    ``crops`` entries of ``pooler_output`` (InternVL: one a tile)."""
    with torch.inference_mode():
        pooled = model.model.get_image_features(**image, return_dict=True).pooler_output
    return sum(x.shape[0] for x in pooled[:crops])


def _build_next(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import LlavaNextForConditionalGeneration

    model = random_models.seeded_model(LlavaNextForConditionalGeneration, next_config(s), seed, device,
                                       dtype=dtype).eval()
    random_models.sharpen_attention(model.model.vision_tower, sharpen)
    side = random_models.PRESETS[s.tower]["image_size"]
    crops = 1 + (s.image[0] // side) * (s.image[1] // side)
    cache = {}

    def inputs(batch, seed):
        if batch not in cache:
            pixels = torch.randn(batch, crops, 3, side, side, generator=_generator(device, seed), device=device,
                                 dtype=dtype)
            image = dict(pixel_values=pixels, image_sizes=torch.tensor([list(s.image)] * batch, device=device))
            cache[batch] = image, _stock_count(model, image)
        return cache[batch]

    def call(ids, **image):
        return model(input_ids=ids, **image, use_cache=True, logits_to_keep=1)

    n_layers = len(find_tower(model.model.vision_tower).layers)
    make = _prefill_methods(s, model, device, lambda count: [IMAGE_TOKEN] * count, inputs, call,
                            [_tokens(model)] * n_layers)
    return BuiltScenario(s.name, weights_mb(model), make, model, dict(crops=crops))


def _tokens(model) -> int:
    """Tokens of one CLIP crop (CLS included)."""
    tower = find_tower(model.model.vision_tower)
    return tower.num_patches + 1


def _methods(include: set[str], backends: list[str], unpruned: Callable[[], "MethodResult"],
             pruned: Callable[[str], "MethodResult"]) -> dict:
    """A tower scenario's methods, those named in ``include``: ``unpruned`` (a call) and ``flowcut-<backend>``
    (``pruned(backend)``) for each of ``backends``."""
    found = {"unpruned": unpruned} if "unpruned" in include else {}
    if "flowcut" in include:
        found.update({f"flowcut-{backend}": functools.partial(pruned, backend) for backend in backends})
    return found


def _build_next_crops(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from ..models.encoder import PACKED_OPS, run_pruned
    from ..models.anyres import CropPolicy

    tower_model = random_models.random_clip_vision(s.tower, seed=seed, sharpen=sharpen, dtype=dtype, device=device)
    tower = find_tower(tower_model)
    side = random_models.PRESETS[s.tower]["image_size"]
    crops = 1 + (s.image[0] // side) * (s.image[1] // side)
    layers = len(tower.layers)
    feature_idx = layers - 2

    def make(batch, target, backends, include, seed):
        pixels = random_models.random_pixels(tower_model, batch * crops, seed=seed)

        def unpruned():
            out = tower_model(pixel_values=pixels, output_hidden_states=True)
            features = out.hidden_states[-2][:, 1:]
            return MethodResult(features, None, [out.hidden_states[0].shape[1]] * layers, crops * features.shape[1])

        def pruned(name):
            backend = ops.resolve_backend(name, tower.device, tower.dtype, PACKED_OPS)
            policy = CropPolicy(target // 2, [crops] * batch)
            last, keep, tokens = run_pruned(tower, tower.embed(pixels), policy, feature_idx, backend, per_image=True)
            return MethodResult(last[:, 1:], keep, tokens[0], crops * (target // 2))

        return _methods(include, backends, unpruned, pruned)

    return BuiltScenario(s.name, weights_mb(tower_model), make, tower_model, dict(crops=crops))


def _qwen_pixels(visual_config, s: Scenario, batch: int, device, dtype, seed) -> tuple[Tensor, Tensor]:
    h, w = s.image
    width = visual_config.in_channels * visual_config.temporal_patch_size * visual_config.patch_size**2
    pixels = torch.randn(batch * s.frames * h * w, width, generator=_generator(device, seed), device=device,
                         dtype=dtype)
    grid = torch.tensor([[s.frames, h, w]] * batch, device=device)
    return pixels, grid


def _rows_seen(fn: Callable[[], object], *watched: tuple) -> list[list[int]]:
    """For each (modules, dim) of ``watched``: the size along ``dim`` of each call's hidden states (the first
    argument) during ``fn()``, module call by module call (forward pre-hooks)."""
    seen = [[] for _ in watched]

    def hook(out, dim):
        return lambda m, args, kw: out.append(int((args[0] if args else kw["hidden_states"]).shape[dim]))

    hooks = [module.register_forward_pre_hook(hook(out, dim), with_kwargs=True)
             for out, (modules, dim) in zip(seen, watched) for module in modules]
    try:
        with torch.inference_mode():
            fn()
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def _tower_tokens(visual: nn.Module, fn: Callable[[], object]) -> list[int]:
    """The patches each tower block processed during ``fn()``."""
    return _rows_seen(fn, (visual.blocks, 0))[0]


def _qwen_tower_model(s: Scenario) -> tuple[type, object]:
    """The vision-tower class and config of a ``qwen-tower`` (Qwen2-VL) or ``qwen3-tower`` (Qwen3-VL) scenario."""
    if s.kind == "qwen-tower":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel, qwen_config(s)
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return Qwen3VLVisionModel, Qwen3VLVisionConfig(**s.tower)


def _build_qwen_tower(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from ..models.qwen2_vl import TOWER_OPS, frame_split, pruned_media

    visual = random_models.seeded_model(*_qwen_tower_model(s), seed, device, dtype=dtype).eval()
    random_models.sharpen_qwen_attention(visual, sharpen)
    m = visual.spatial_merge_size**2
    patches = s.frames * s.image[0] * s.image[1]
    groups = patches // m

    def make(batch, target, backends, include, seed):
        pixels, grid = _qwen_pixels(visual.config, s, batch, device, dtype, seed)

        def unpruned():
            merged = visual(pixels, grid_thw=grid).pooler_output
            return MethodResult(merged.view(batch, groups, -1), None, [patches] * len(visual.blocks), groups)

        def pruned(name):  # a video: its frames' shares of K (models.qwen2_vl.frame_split), all in one pass
            backend = ops.resolve_backend(name, visual.device, visual.dtype, TOWER_OPS)
            hidden, keep, _ = pruned_media(visual, pixels, grid, [frame_split(target, s.frames)] * batch, backend)
            return MethodResult(visual.merger(hidden).view(batch, target, -1), torch.stack(keep), [], target)

        found = _methods(include, backends, unpruned, pruned)
        for key in [key for key in found if key.startswith("flowcut-")]:  # every image alike: the same schedule
            found[key] = _with_tokens(found[key], [n // batch for n in _tower_tokens(visual, found[key])])
        return found

    return BuiltScenario(s.name, weights_mb(visual), make, visual, dict(groups=groups))


def _with_tokens(fn, tokens, flops=None):
    def run():
        result = fn()
        result.tokens_per_layer = tokens
        result.flops = flops
        return result

    return run


def qwen_prefill_flops(vision, text, tower_tokens: list[int], merged: int, lm_tokens: list[int]) -> float:
    """Floating-point operations (multiply and add: 2 a product) of one Qwen2-VL prefill of one image.

    vision, text: the tower's and the language model's configs. tower_tokens: the patches each tower block
    processed; merged: the groups the merger made; lm_tokens: the tokens each decoder layer processed. Counted: the
    patch embedding of the first block's patches; per block q/k/v/o and the MLP (2·n·(4d² + 2·d·d_mlp)) and
    attention (2·2·n²·d, full); the merger; per decoder layer the projections and the gated MLP (2·L·(2h² + 2h·kv +
    3h·I)) and causal attention (2·L²·h); the last position's logits. Left out: norms, rotary embeddings, softmax
    (linear in the tokens) and FlowCut's own scoring (O(n·d) a scored layer).
    """
    d, merge = vision.embed_dim, vision.spatial_merge_size**2
    mlp = int(d * vision.mlp_ratio)
    patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    total = 2 * tower_tokens[0] * patch_in * d
    total += sum(2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d for n in tower_tokens)
    total += 2 * merged * (merge * d * merge * d + merge * d * vision.hidden_size)
    h, inter = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * h // text.num_attention_heads
    total += sum(2 * n * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * n * n * h for n in lm_tokens)
    return total + 2 * h * text.vocab_size


def _build_qwen(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import Qwen2VLForConditionalGeneration

    model = random_models.seeded_model(Qwen2VLForConditionalGeneration, qwen_config(s), seed, device,
                                       dtype=dtype).eval()
    visual = model.model.visual
    random_models.sharpen_qwen_attention(visual, sharpen)
    TYPE_IDS = "mm_token_type_ids" in inspect.signature(type(model.model).forward).parameters
    m = visual.spatial_merge_size**2
    groups = s.image[0] * s.image[1] // m
    ids = s.ids
    vocab = s.lm["vocab_size"]
    text = model.config.text_config
    layers = text.num_hidden_layers

    def image_ids(count):
        return [ids["vision_start_token_id"], *[ids["image_token_id"]] * count, ids["vision_end_token_id"]]

    def make(batch, target, backends, include, seed):
        pixels, grid = _qwen_pixels(visual.config, s, batch, device, dtype, seed)
        found = {}

        def call(prompt):
            extra = {}
            if TYPE_IDS:  # transformers > 5.0: the processor's mm_token_type_ids (1 at image tokens)
                extra["mm_token_type_ids"] = (prompt == ids["image_token_id"]).long()
            return model(input_ids=prompt, pixel_values=pixels, image_grid_thw=grid, use_cache=True, logits_to_keep=1,
                         **extra)

        if "unpruned" in include:
            prompt = _prompt(s, image_ids(groups), device, seed, vocab, batch)

            patches = [s.image[0] * s.image[1]] * len(visual.blocks)
            flops = batch * qwen_prefill_flops(visual.config, text, patches, groups, [prompt.shape[1]] * layers)

            def unpruned(prompt=prompt, flops=flops):
                return MethodResult(call(prompt).logits, None, patches, groups, prompt.shape[1], flops=flops)

            found["unpruned"] = unpruned
        if "flowcut" in include:
            prompt = _prompt(s, image_ids(target), device, seed, vocab, batch)
            for backend in backends:
                def run(backend=backend, prompt=prompt):
                    with _Patched(model, target, backend):
                        logits = call(prompt).logits
                    return MethodResult(logits, None, [], target, prompt.shape[1])

                blocks, merger, decoder = _rows_seen(run, (visual.blocks, 0), ([visual.merger], 0),
                                                     (model.model.language_model.layers, 1))
                per_layer = [n // batch for n in blocks]
                flops = batch * qwen_prefill_flops(visual.config, text, per_layer, merger[0] // (m * batch), decoder)
                found[f"flowcut-{backend}"] = _with_tokens(run, per_layer, flops)
        return found

    return BuiltScenario(s.name, weights_mb(model), make, model, dict(groups=groups))


def _pixels(batch: int, side: int, device, dtype, seed: int) -> Tensor:
    """(batch, 3, side, side) seeded normal pixels."""
    return torch.randn(batch, 3, side, side, generator=_generator(device, seed), device=device, dtype=dtype)


def _siglip(fields: dict, device, dtype, seed, sharpen) -> nn.Module:
    """A seeded random ``SiglipVisionModel`` of ``fields``, q/k sharpened, in eval mode."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = random_models.seeded_model(SiglipVisionModel, SiglipVisionConfig(**fields), seed, device, dtype=dtype)
    return random_models.sharpen_attention(model, sharpen).eval()


def gemma3_config(s: Scenario):
    """The ``Gemma3Config`` of a ``gemma3-tower`` scenario: its SigLIP tower and projector, around a one-layer stand-in
    decoder of the text width (which the tower presets never run); of a whole-model ``gemma3`` scenario: with its
    decoder (``s.lm["text"]``) and image-token ids (``s.ids``)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    fields = s.lm.get("text") or dict(
        vocab_size=64, hidden_size=s.lm["text_hidden"], intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=512,
        layer_types=["full_attention"])
    text = Gemma3TextConfig(**fields, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return Gemma3Config(vision_config=SiglipVisionConfig(**s.tower), text_config=text,
                        mm_tokens_per_image=s.lm["mm_tokens_per_image"],
                        **(s.ids or dict(boi_token_index=61, eoi_token_index=62, image_token_index=63)))


def gemma3_model(cls, s: Scenario, device, dtype, seed, sharpen) -> nn.Module:
    """The seeded random ``cls`` (``Gemma3Model`` or ``Gemma3ForConditionalGeneration``) of :func:`gemma3_config`,
    its projection given weights (the stock one starts at zero) and its SigLIP q/k sharpened, in eval mode."""
    model = random_models.seeded_model(cls, gemma3_config(s), seed, device, dtype=dtype).eval()
    core = getattr(model, "model", model)
    with torch.no_grad():
        core.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    random_models.sharpen_attention(core.vision_tower, sharpen)
    return model


def _image_features_scenario(s: Scenario, model: nn.Module, stock_rows: int, keep: Callable[[Tensor], Tensor],
                             device, dtype) -> BuiltScenario:
    """A tower preset of a VLM core ``model`` (its ``get_image_features``: tower and projector; each of the
    (batch, 3, S, S) seeded pixels an image): ``unpruned`` the stock method, (batch, N, C) pooled, ``flowcut-<backend>``
    the method after ``flowcut(model, K)``, (batch, K, C). stock_rows: the rows each stock tower layer processes;
    keep(keep_indices): the patched method's keep_indices as the (batch, K) kept groups."""
    side, layers = s.tower["image_size"], s.tower["num_hidden_layers"]

    def pixels(batch, seed):
        return _pixels(batch, side, device, dtype, seed)

    def make(batch, target, backends, include, seed):
        images = pixels(batch, seed)

        def unpruned():
            pooled = model.get_image_features(images, return_dict=True).pooler_output
            return MethodResult(pooled, None, [stock_rows] * layers, pooled.shape[1])

        def pruned(backend):
            with _Patched(model, target, backend):
                out = model.get_image_features(images, return_dict=True)
            return MethodResult(out.pooler_output, keep(out.keep_indices), out.tokens_per_layer[0], target)

        return _methods(include, backends, unpruned, pruned)

    return BuiltScenario(s.name, weights_mb(model.vision_tower) + weights_mb(model.multi_modal_projector), make, model,
                         dict(pixels=pixels))


def _build_gemma3_tower(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import Gemma3Model

    model = gemma3_model(Gemma3Model, s, device, dtype, seed, sharpen)
    return _image_features_scenario(s, model, s.image[0] * s.image[1], lambda keep: keep, device, dtype)


def internvl_config(s: Scenario):
    """The ``InternVLConfig`` of an ``internvl-tower`` scenario: its InternViT tower, pixel shuffle and projector,
    around a one-layer stand-in decoder of the text width (which the tower presets never run); of a whole-model
    ``internvl`` scenario: with its Qwen2 decoder (``s.lm["text"]``) and image-context id (``s.ids``)."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    if "text" in s.lm:
        text = Qwen2Config(**s.lm["text"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        text = LlamaConfig(vocab_size=64, hidden_size=s.lm["text_hidden"], intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3)
    tokens = (s.tower["image_size"] // s.tower["patch_size"]) ** 2 // 4  # a tile's tokens after the 2×2 shuffle
    return InternVLConfig(vision_config=InternVLVisionConfig(**s.tower).to_dict(), text_config=text.to_dict(),
                          image_token_id=(s.ids or INTERNVL_IDS_TINY)["image_token_id"], image_seq_length=tokens,
                          downsample_ratio=0.5, tie_word_embeddings=text.tie_word_embeddings)  # 5.25 ties by default


def internvl_model(cls, s: Scenario, device, dtype, seed, sharpen) -> nn.Module:
    """The seeded random ``cls`` (``InternVLModel`` or ``InternVLForConditionalGeneration``) of
    :func:`internvl_config`, in eval mode: InternViT's CLS row and position table given values (the stock ones start
    at zero), its q and k projections (weights and biases) multiplied by ``sharpen``."""
    model = random_models.seeded_model(cls, internvl_config(s), seed, device, dtype=dtype).eval()
    tower = getattr(model, "model", model).vision_tower
    with torch.no_grad():
        tower.embeddings.cls_token.normal_(std=0.02)
        tower.embeddings.position_embeddings.normal_(std=0.02)
        for layer in tower.encoder.layer:
            for proj in (layer.attention.q_proj, layer.attention.k_proj):
                proj.weight.mul_(sharpen)
                proj.bias.mul_(sharpen)
    return model


def _build_internvl_tower(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import InternVLModel

    model = internvl_model(InternVLModel, s, device, dtype, seed, sharpen)
    return _image_features_scenario(s, model, 1 + s.image[0] * s.image[1], lambda keep: keep[..., 1], device, dtype)


def internvl_tiles(s: Scenario) -> int:
    """The tiles of an ``internvl`` scenario's (H, W)-pixel image: its grid of tiles of the tower's side, plus the
    thumbnail (the whole image) when the grid holds more than one, as InternVL's image processor crops it."""
    side = s.tower["image_size"]
    grid = (s.image[0] // side) * (s.image[1] // side)
    return grid + (grid > 1)


def onevision_crops(s: Scenario) -> int:
    """The crops of a ``onevision-crops`` scenario's image: the base crop and its anyres grid (OneVision's default
    ``image_grid_pinpoints`` unless the scenario gives its own)."""
    from transformers import LlavaOnevisionConfig

    from ..models import seams

    pinpoints = s.pinpoints or LlavaOnevisionConfig().image_grid_pinpoints
    return int(seams.anyres()[1](list(s.image), pinpoints, s.tower["image_size"]))


def _build_onevision_crops(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from ..models.anyres import CropPolicy
    from ..models.encoder import PACKED_OPS, run_pruned

    tower_model = _siglip(s.tower, device, dtype, seed, sharpen)
    tower = find_tower(tower_model)
    side = s.tower["image_size"]
    crops = onevision_crops(s)
    layers = len(tower.layers)

    def pixels_of(batch, seed):
        return _pixels(batch * crops, side, device, dtype, seed)

    def make(batch, target, backends, include, seed):
        pixels = pixels_of(batch, seed)

        def unpruned():
            out = tower_model(pixel_values=pixels, output_hidden_states=True)
            features = out.hidden_states[-1]  # OneVision's vision_feature_layer -1, "full": every patch
            return MethodResult(features, None, [features.shape[1]] * layers, crops * features.shape[1])

        def pruned(name):
            backend = ops.resolve_backend(name, tower.device, tower.dtype, PACKED_OPS)
            policy = CropPolicy(target // 2, [crops] * batch, has_cls=False)
            last, keep, tokens = run_pruned(tower, tower.embed(pixels), policy, layers - 1, backend, per_image=True)
            return MethodResult(last, keep, tokens[0], crops * (target // 2))

        return _methods(include, backends, unpruned, pruned)

    return BuiltScenario(s.name, weights_mb(tower_model), make, tower_model, dict(crops=crops, pixels=pixels_of))


def onevision_config(s: Scenario):
    """The ``LlavaOnevisionConfig`` of a whole-model ``onevision`` scenario (OneVision's default
    ``image_grid_pinpoints`` unless the scenario gives its own; vision feature layer -1, strategy "full")."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    pinpoints = {"image_grid_pinpoints": s.pinpoints} if s.pinpoints else {}
    return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**s.tower),
                                text_config=Qwen2Config(**s.lm, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                                vision_feature_layer=-1, vision_feature_select_strategy="full", **pinpoints, **s.ids)


def _build_gemma3(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import Gemma3ForConditionalGeneration

    model = gemma3_model(Gemma3ForConditionalGeneration, s, device, dtype, seed, sharpen)
    ids = s.ids
    side = s.tower["image_size"]

    def inputs(batch, seed):
        return dict(pixel_values=_pixels(batch, side, device, dtype, seed)), model.config.mm_tokens_per_image

    def call(prompt, **image):
        marks = (prompt == ids["image_token_index"]).long()  # the processor's token_type_ids
        return model(input_ids=prompt, **image, token_type_ids=marks, use_cache=True, logits_to_keep=1)

    make = _prefill_methods(s, model, device,
                            lambda count: [ids["boi_token_index"], *[ids["image_token_index"]] * count,
                                           ids["eoi_token_index"]],
                            inputs, call, [s.image[0] * s.image[1]] * s.tower["num_hidden_layers"])
    return BuiltScenario(s.name, weights_mb(model), make, model)


def _build_onevision(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import LlavaOnevisionForConditionalGeneration

    model = random_models.seeded_model(LlavaOnevisionForConditionalGeneration, onevision_config(s), seed, device,
                                       dtype=dtype).eval()
    random_models.sharpen_attention(model.model.vision_tower, sharpen)
    side = s.tower["image_size"]
    crops = onevision_crops(s)
    cache = {}

    def inputs(batch, seed):
        if batch not in cache:
            image = dict(pixel_values=_pixels(batch * crops, side, device, dtype, seed).view(batch, crops, 3, side,
                                                                                              side),
                         image_sizes=torch.tensor([list(s.image)] * batch, device=device))
            cache[batch] = image, _stock_count(model, image)
        return cache[batch]

    def call(prompt, **image):
        return model(input_ids=prompt, **image, use_cache=True, logits_to_keep=1)

    patches = (side // s.tower["patch_size"]) ** 2
    make = _prefill_methods(s, model, device, lambda count: [s.ids["image_token_index"]] * count, inputs, call,
                            [patches] * s.tower["num_hidden_layers"])
    return BuiltScenario(s.name, weights_mb(model), make, model, dict(crops=crops))


def _build_internvl(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from transformers import InternVLForConditionalGeneration

    model = internvl_model(InternVLForConditionalGeneration, s, device, dtype, seed, sharpen)
    ids = s.ids
    side = s.tower["image_size"]
    tiles = internvl_tiles(s)
    cache = {}

    def inputs(batch, seed):
        if batch not in cache:
            image = dict(pixel_values=_pixels(batch * tiles, side, device, dtype, seed))  # image by image, tile by tile
            cache[batch] = image, _stock_count(model, image, tiles)
        return cache[batch]

    def call(prompt, **image):
        return model(input_ids=prompt, **image, use_cache=True, logits_to_keep=1)

    def tile_counts(batch):  # the processor's per-image tile counts, which the patched model takes
        return dict(image_num_patches=torch.tensor([tiles] * batch, device=device))

    patches = (side // s.tower["patch_size"]) ** 2
    make = _prefill_methods(s, model, device,
                            lambda count: [ids["start_image_token_id"], *[ids["image_token_id"]] * count,
                                           ids["end_image_token_id"]],
                            inputs, call, [1 + patches] * s.tower["num_hidden_layers"], tile_counts)
    return BuiltScenario(s.name, weights_mb(model), make, model, dict(crops=tiles))


def vit_model(s: Scenario, device, dtype, seed, sharpen) -> nn.Module:
    """The seeded random ``ViTModel`` (no pooler) or ``Dinov2WithRegistersModel`` of a ``vit-tower`` /
    ``dinov2-tower`` scenario: q/k sharpened, CLS (and registers) random rather than DINOv2's zero start."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig, ViTModel

    torch.manual_seed(seed)
    with torch.device(device):
        if s.kind == "vit-tower":
            model = ViTModel._from_config(ViTConfig(**s.tower), attn_implementation="sdpa", dtype=dtype,
                                          add_pooling_layer=False)
        else:
            model = Dinov2WithRegistersModel._from_config(Dinov2WithRegistersConfig(**s.tower),
                                                          attn_implementation="sdpa", dtype=dtype)
    with torch.no_grad():
        for name, param in model.embeddings.named_parameters():
            if name in ("cls_token", "register_tokens"):
                param.normal_(0.0, 1.0)
    return random_models.sharpen_attention(model, sharpen).eval()


def _build_vit_tower(s: Scenario, device, dtype, seed, sharpen) -> BuiltScenario:
    from .. import encode

    model = vit_model(s, device, dtype, seed, sharpen)
    side = s.tower["image_size"]
    first = 1 + s.tower.get("num_register_tokens", 0)  # CLS, registers
    patches = s.image[0] * s.image[1]
    layers = s.tower["num_hidden_layers"]

    def make(batch, target, backends, include, seed):
        pixels = _pixels(batch, side, device, dtype, seed)

        def unpruned():
            features = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, first:]
            return MethodResult(features, None, [first + patches] * layers, patches)

        def pruned(backend):
            out = encode(model, pixels, target, backend=backend)
            return MethodResult(out.features, out.keep_indices, list(out.tokens_per_layer), target)

        return _methods(include, backends, unpruned, pruned)

    return BuiltScenario(s.name, weights_mb(model), make, model,
                         dict(pixels=lambda batch, seed: _pixels(batch, side, device, dtype, seed)))


BUILDERS = {"next": _build_next, "next-crops": _build_next_crops, "qwen-tower": _build_qwen_tower,
            "qwen3-tower": _build_qwen_tower, "qwen": _build_qwen, "gemma3-tower": _build_gemma3_tower,
            "onevision-crops": _build_onevision_crops, "vit-tower": _build_vit_tower, "dinov2-tower": _build_vit_tower,
            "internvl-tower": _build_internvl_tower, "gemma3": _build_gemma3, "onevision": _build_onevision,
            "internvl": _build_internvl}

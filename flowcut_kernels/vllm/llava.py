"""FlowCut for vLLM's LLaVA-1.5 (``LlavaForConditionalGeneration`` with a CLIP tower): the served class.

vLLM's own class, subclassed; without ``flowcut`` in the model's config every override hands over to it. With
``{"flowcut": {"target_num": K}}`` (docs/vllm.md): each image gets K placeholders (the first K of the stock ones;
:mod:`.processing`), and the CLIP tower prunes inside its layers to K tokens per image (:func:`pruned_clip`), which
the model's projector turns into the image's K embeddings. LLaVA's positions are the prompt's own (1-D), so the K
placeholders need nothing more.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import require
from ..models.policy import FlowCutPolicy, LayerView
from ..models.vlm import feature_layer_of
from . import seams
from .config import options
from .processing import FlowCutInfo, require_pixels, served

#: The ops the CLIP tower runs.
CLIP_OPS = ("flow_scores", "select_gather")


def pruned_clip(tower: nn.Module, pixels: Tensor, target: int, feature: int, backend: str) -> tuple[Tensor, Tensor]:
    """vLLM's CLIP tower of LLaVA run with FlowCut to its feature layer, image by image (each on its own schedule).

    The CLIP recipe of docs/semantics.md: CLS variant (relay = the CLS row's query, which stays to the end), each
    layer scored from the q/k/v its attention received, the schedule of
    :class:`~flowcut_kernels.models.policy.FlowCutPolicy` (T = K + 1), layers 0 … F − 1 prune, layer F runs on the
    kept rows; a pruning layer runs whole, then prunes (its MLP acts on each row alone: the same rows as pruning
    before it).

    Args:
        pixels: (B, 3, H, W); target: K; feature: F, the 0-based feature layer (vLLM built layers 0 … F).

    Returns:
        features (B, K, C): layer F's output on the kept patches (CLS row dropped: strategy "default");
        keep_indices (B, K) int64, ascending, the kept patches (0 … N₀ − 1).
    """
    core = seams.clip_core(tower)
    layers = core.encoder.layers
    features, keeps = [], []
    for image in pixels:
        hidden = seams.clip_inputs(core, image[None])  # (1, S, C)
        index_map = torch.arange(hidden.shape[1] - 1, device=hidden.device)[None]
        policy, scores = FlowCutPolicy(target, has_cls=True), None
        for i, layer in enumerate(layers[:feature]):
            steps_left, size = feature - i - 1, hidden.shape[1]
            scored, _ = policy.plan(i, steps_left, [size])
            attention, heads, scale = seams.clip_attention(layer)
            seen = []
            hook = attention.register_forward_pre_hook(lambda module, args: seen.append(args)) if scored else None
            try:
                hidden = layer(hidden)
            finally:
                if hook is not None:
                    hook.remove()
            if not scored:
                continue
            q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in seen[0][:3])  # (1, H, S, D) each
            scores, keep = policy.step(LayerView(i, steps_left, q, k, v, scale, True, [size], None, scores, backend))
            if keep is not None and keep[0] < size:
                hidden, scores, index_map = ops.select_gather(hidden, scores, index_map, keep[0], has_cls=True,
                                                              backend=backend)
        features.append(layers[feature](hidden)[0, 1:])
        keeps.append(index_map[0])
    return torch.stack(features), torch.stack(keeps)


class FlowCutLlavaInfo(FlowCutInfo):
    """:class:`.processing.FlowCutInfo` for LLaVA's processing info (its count takes the image's size only)."""


class FlowCutLlavaModel:
    """Mixin for vLLM's ``LlavaForConditionalGeneration``: the CLIP tower pruned to K tokens per image."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.flowcut = options(self.config)
        if self.flowcut is None:
            return
        seams.check_release()
        config = self.config
        require(seams.clip_core(self.vision_tower) is not None,
                f"flowcut_kernels.vllm prunes LLaVA with a CLIP vision tower (LLaVA-1.5); this model's tower is "
                f"{type(config.vision_config).__name__}: serve it without the 'flowcut' key")
        require(config.vision_feature_select_strategy == "default",
                f"flowcut_kernels.vllm prunes LLaVA-1.5's vision_feature_select_strategy 'default' (the CLS row "
                f"dropped); this model's is {config.vision_feature_select_strategy!r}: serve it without the "
                f"'flowcut' key")
        vision, target = config.vision_config, self.flowcut.target_num
        patches = (vision.image_size // vision.patch_size) ** 2
        require(target <= patches, f"flowcut.target_num={target} is more than the {patches} patches of this model's "
                                   f"vision tower ({vision.image_size}² pixels in {vision.patch_size}-pixel patches); "
                                   f"set flowcut.target_num <= {patches}")
        layers = config.vision_config.num_hidden_layers
        self._flowcut_feature = layers + feature_layer_of(config.vision_feature_layer, layers)
        ops.resolve_backend(self.flowcut.backend, self.vision_tower.device, self.vision_tower.dtype, CLIP_OPS)

    def _process_image_input(self, image_input):
        if self.flowcut is None:
            return super()._process_image_input(image_input)
        require_pixels(image_input)
        tower = self.vision_tower
        backend = ops.resolve_backend(self.flowcut.backend, tower.device, tower.dtype, CLIP_OPS)
        features, _ = pruned_clip(tower, image_input["pixel_values"], self.flowcut.target_num,
                                  self._flowcut_feature, backend)
        return self.multi_modal_projector(features)


def _not_clip(ctx) -> bool:
    """A LLaVA config whose tower is not CLIP's (Pixtral's, SigLIP's): vLLM's own processing serves it."""
    return ctx.get_hf_config().vision_config.model_type != "clip_vision_model"


FlowCutLlavaForConditionalGeneration = served(seams.llava(), "Llava", (FlowCutLlavaModel, FlowCutLlavaInfo), __name__,
                                              other=_not_clip)

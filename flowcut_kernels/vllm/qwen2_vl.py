"""FlowCut for vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the served classes that replace vLLM's for those
architectures.

Each class is vLLM's own, subclassed; without ``flowcut`` in the model's config every override hands over to it, so
the model runs as stock vLLM. With ``{"flowcut": {"target_num": K}}`` (docs/vllm.md):

- processing: each image gets K_b = min(K, G₀_b) placeholders (G₀_b merge groups) — its prompt update keeps the first
  K_b of the stock ones — and the token budgeting (``get_num_image_tokens``, the profiling's largest image) sees K_b;
  videos are refused (their limit is 0);
- encoder: :func:`.tower.pruned_tower` runs the tower with FlowCut, the model's merger makes the K_b tokens of each
  image (Qwen3-VL: each followed by its group's DeepStack features, the channels vLLM's own tower appends, which
  vLLM adds to the first decoder layers' outputs at that token), and the kept groups' M-RoPE (t, h, w) offsets
  travel as 3 extra channels of each image's embeddings (the encoder cache keeps them with the tokens, so a later
  prefill chunk finds them too);
- positions: :func:`.positions.prompt_positions` when the request is scheduled (each image's placeholders at the
  image's first position); in each step ``embed_input_ids`` strips the channels and the ``forward`` adds each kept
  token's offsets to its position (:func:`.positions.with_kept`): every kept token keeps its original (t, h, w).
"""

from __future__ import annotations

import torch

from .. import ops
from . import seams
from .config import options
from .positions import prompt_positions, with_kept
from .processing import FlowCutInfo, require_pixels, served
from .tower import TOWER_OPS, group_positions, pruned_tower

#: The channels appended to each image embedding: its kept group's (t, h, w) offsets.
POSITION_CHANNELS = 3


class FlowCutQwenInfo(FlowCutInfo):
    """:class:`.processing.FlowCutInfo` for a Qwen processing-info class, whose count takes the image processor."""

    def count_kwargs(self) -> dict:
        return dict(image_processor=self.get_image_processor(), mm_kwargs={})


class FlowCutModel:
    """Mixin for a Qwen2-VL (2.5-VL, 3-VL) model class: the pruned tower, the kept tokens' positions."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.flowcut = options(self.config)
        self._kept_offsets = None  # (slots, (R, 3) offsets) from embed_input_ids to the forward of one step
        if self.flowcut is not None:
            seams.check_release()
            ops.resolve_backend(self.flowcut.backend, self.visual.device, self.visual.dtype, TOWER_OPS)

    def _process_image_input(self, image_input):
        if self.flowcut is None:
            return super()._process_image_input(image_input)
        require_pixels(image_input)
        grid = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        groups = (grid.prod(-1) // merge**2).tolist()
        targets = [min(self.flowcut.target_num, g) for g in groups]
        backend = ops.resolve_backend(self.flowcut.backend, self.visual.device, self.visual.dtype, TOWER_OPS)
        hidden, keep_groups, deepstack = pruned_tower(self.visual, image_input["pixel_values"], grid, targets,
                                                      backend)
        merged = torch.cat([self.visual.merger(hidden), *deepstack], dim=1).split(targets)
        return tuple(
            torch.cat([emb, group_positions(kept, g, merge).to(emb.device, emb.dtype)], dim=1)
            for emb, kept, g in zip(merged, keep_groups, grid.tolist())
        )

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.flowcut is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.visual.spatial_merge_size
        images = []
        for feature in sorted(mm_features, key=seams.feature_offset):
            t, h, w = seams.image_grid(feature)
            count = seams.placeholder_count(feature)
            images.append((seams.feature_offset(feature), count, (t, h // merge, w // merge)))
        return prompt_positions(len(input_tokens), images)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, **kwargs):
        if self.flowcut is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, **kwargs)
        offsets = torch.cat([mm[:, -POSITION_CHANNELS:] for mm in multimodal_embeddings]).round().long()
        self._kept_offsets = (kwargs["is_multimodal"].nonzero()[:, 0], offsets)
        stripped = [mm[:, :-POSITION_CHANNELS] for mm in multimodal_embeddings]
        return super().embed_input_ids(input_ids, stripped, **kwargs)

    def forward(self, input_ids, positions, *args, **kwargs):
        if self._kept_offsets is not None:
            slots, offsets = self._kept_offsets
            self._kept_offsets = None
            positions = with_kept(positions, slots.to(positions.device), offsets.to(positions.device))
        return super().forward(input_ids, positions, *args, **kwargs)


FlowCutQwen2VLForConditionalGeneration = served(
    seams.qwen2_vl(), "Qwen2VL", (FlowCutModel, FlowCutQwenInfo), __name__,
)
FlowCutQwen2_5_VLForConditionalGeneration = served(
    seams.qwen2_5_vl(), "Qwen2_5_VL", (FlowCutModel, FlowCutQwenInfo), __name__,
)
FlowCutQwen3VLForConditionalGeneration = served(
    seams.qwen3_vl(), "Qwen3VL", (FlowCutModel, FlowCutQwenInfo), __name__,
)

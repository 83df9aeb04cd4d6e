"""FastV (Chen et al., ECCV 2024) on the public primitives: after decoder layer K − 1, keep the image tokens the
last prompt token attends to most, drop the rest for every later layer (prefill of a HF Llama-family model).

The attention comes from layer K − 1's own q and k (after RoPE, grouped-query aware) through the attention
seam of :mod:`flowcut_kernels.models.attention`; the kept tokens keep their original positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..models import seams
from ..models.attention import capturing


def fastv_prefill(
    model: nn.Module, inputs_embeds: Tensor, image: tuple[int, int], keep: int, layer: int = 2, backend: str = "auto",
    cache=None,
) -> Tensor:
    """Run a HF ``LlamaModel``-like decoder with FastV; returns the last hidden states (B, L', C).

    inputs_embeds: (B, L, C); image: (start, end) of the image tokens (the same in every row); keep: image
    tokens kept after layer ``layer`` − 1. cache: None, or an empty HF cache (``seams.new_cache``) that the layers
    fill: layers 0 … ``layer`` − 1 with all L positions, the later ones with the L' kept; decode steps then run the
    stock model on it (the next position is L, the first layer's length; the kept tokens keep their positions).
    """
    hidden = inputs_embeds
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    with capturing(model.config) as seen:
        for i, block in enumerate(model.layers):
            seen.watch = block.self_attn if i == layer - 1 else None
            embeddings = model.rotary_emb(hidden, positions)
            hidden = block(hidden, position_ids=positions, position_embeddings=embeddings, **seams.cache_arg(cache),
                           use_cache=cache is not None)
            if i == layer - 1:
                q, k, _, scale = seen.seen
                # The last token's attention over the keys; the image span competes, the text around it stays.
                scores = ops.attention_scores(q[:, :, -1:], k, scale=scale, backend=backend)
                rows = ops.topk_select(scores, keep, span=image, backend=backend).kept
                hidden, positions = ops.gather_rows(hidden, rows), positions.gather(1, rows)
    return model.norm(hidden)

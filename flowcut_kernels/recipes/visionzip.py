"""VisionZip (Yang et al., CVPR 2025) on the public primitives: dominant + contextual tokens.

From the feature layer of a CLIP tower: the ``dominant`` patches the CLS row attends to most (head-mean
attention of that layer), then the remaining patches folded into ``contextual`` tokens — targets spaced
evenly through the remaining ones; every other remaining patch joins its most similar target (cosine of the
layer's head-mean keys), and a contextual token is its target plus the mean of the patches that joined it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops


def visionzip(
    hidden: Tensor, q: Tensor, k: Tensor, *, scale: float, dominant: int, contextual: int, backend: str = "auto"
) -> Tensor:
    """hidden (B, S, C) the feature layer's output (CLS row first); q, k (B, H, S, D) that layer's queries and keys.

    Returns (B, dominant + contextual, C): the dominant patches in their order, then the contextual tokens.
    """
    batch, seq, _ = hidden.shape
    patches = hidden[:, 1:]
    cls_attention = ops.attention_scores(q[:, :, :1], k, scale=scale, span=(1, seq), backend=backend)  # (B, S − 1)
    top = ops.topk_select(cls_attention, dominant, backend=backend)
    rest = top.dropped  # (B, M) remaining patches, ascending
    step = max(1, rest.shape[1] // contextual)
    targets = torch.zeros(rest.shape[1], dtype=torch.bool, device=hidden.device)
    targets[torch.arange(0, rest.shape[1], step, device=hidden.device)[:contextual]] = True
    # Among the remaining patches, the targets are "kept" and the others merge into them. A target weighs 0,
    # so the merge gives the mean of what joined it; the contextual token adds the target itself.
    pick = ops.topk_select(targets.float().expand(batch, -1), 0, protect=targets.expand(batch, -1), backend=backend)
    rest_hidden = ops.gather_rows(patches, rest)
    rest_keys = ops.gather_rows(k.mean(dim=1)[:, 1:], rest)
    sizes = (~targets).to(hidden.dtype).expand(batch, -1)
    joined, count = ops.merge_nearest(rest_hidden, rest_keys, pick, sizes=sizes, backend=backend)
    target_hidden = ops.gather_rows(rest_hidden, pick.kept)
    context = target_hidden + torch.where(count[..., None] > 0, joined, 0)
    return torch.cat([ops.gather_rows(patches, top.kept), context], dim=1)

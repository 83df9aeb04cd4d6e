"""FlowCut inside vLLM's Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower, in whole merge groups (docs/vllm.md).

The same pruning as the transformers patch (``flowcut_kernels.models.qwen2_vl``, docs/semantics.md): every block runs
with vLLM's own modules and is scored from the q/k/v its attention received (after the tower's rotary embedding;
relay = the image's mean query), rpl = L − ℓ − 1; a group's score is the sum of its m = merge² members' S_cum; the
schedule rule is :func:`~flowcut_kernels.models.policy.scheduled_keep` with T = T_g + 1; each image keeps its own
count (per-image schedules in one packed pass), T_g = min(target_num, G₀_b) at the end. Qwen2.5-VL's window order and
windows are kept for the kept groups, as in the transformers patch. Qwen3-VL: its learned position table is added
before block 0, and after each DeepStack layer ℓ its merger turns the groups present at ℓ into one feature each; a
later prune keeps the rows of the groups it keeps, so each kept group ends with its own features of every DeepStack
layer, taken at the layer they come from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..models.policy import scheduled_keep
from . import seams

#: The ops the tower runs.
TOWER_OPS = ("flow_scores_varlen", "topk_select")


def _offsets(lengths, device) -> Tensor:
    return torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)


def _group_order(visual: nn.Module, grid: list[list[int]], groups: list[int]) -> tuple[Tensor, Tensor]:
    """(Σ G₀_b,) global group numbers in the order the blocks see them, and each one's window (Qwen2-VL: one window
    per image, no reorder)."""
    if hasattr(visual, "window_size"):
        return seams.window_order(visual, grid)
    return torch.arange(sum(groups)), torch.arange(len(groups)).repeat_interleave(torch.tensor(groups))


def pruned_tower(visual: nn.Module, pixels: Tensor, grid: Tensor, targets: list[int], backend: str):
    """Run vLLM's Qwen2-VL (2.5-VL, 3-VL) tower with FlowCut, without its merger.

    Args:
        pixels: (P, C_in·t·p·p) the processor's patches of the batch's images; grid: (B, 3) their (t, h, w) grids.
        targets: B ints, the groups each image keeps (T_g ≤ G₀_b).

    Returns:
        hidden (Σ m·T_g, C_vision): the last block's output on the kept patches, image by image, each image's groups
        ascending; keep_groups: B int64 tensors (T_g,), ascending, the kept merge groups (row-major over (t, h/2, w/2));
        deepstack: per DeepStack layer (Qwen3-VL; else none), (Σ T_g, C_out) the kept groups' features of that
        layer's merger, in the rows of ``hidden``'s groups.
    """
    m = visual.spatial_merge_size**2
    grid_list = grid.tolist()
    groups = [t * h * w // m for t, h, w in grid_list]
    hidden = seams.tower_inputs(visual, pixels, grid_list)
    cos, sin = seams.tower_rotary(visual, grid_list)
    number, window = _group_order(visual, grid_list, groups)
    rows = (number[:, None] * m + torch.arange(m)).flatten().to(hidden.device)
    hidden, cos, sin = hidden[rows], cos[rows], sin[rows]
    cum = None
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    layers = len(visual.blocks)
    full = getattr(visual, "fullatt_block_indexes", range(layers))
    mergers, deepstack = seams.deepstack_mergers(visual), []
    for layer, block in enumerate(visual.blocks):
        cu = _offsets([g * m for g in groups], hidden.device)
        lengths = window.unique_consecutive(return_counts=True)[1] * m
        attention, seen = seams.tower_attention(block), []
        hook = attention.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((kwargs["query"], kwargs["key"], kwargs["value"])),
            with_kwargs=True,
        )
        try:
            hidden = seams.run_block(visual, block, hidden, cu if layer in full else
                                     _offsets(lengths.tolist(), hidden.device), cos, sin)
        finally:
            hook.remove()
        if layer in mergers:
            deepstack.append(mergers[layer](hidden))  # (G, C_out): one feature per present group
        if groups == targets:
            continue
        q, k, v = (x[0] for x in seen[0])  # (S, H, D) each
        relay = torch.stack([part.to(compute).mean(0) for part in q.split([g * m for g in groups])]).to(q.dtype)
        cum, entropy, _ = ops.flow_scores_varlen(relay, k, v, cu, cum, scale=attention.scale, has_cls=False,
                                                 backend=backend)
        keep = scheduled_keep(entropy, groups, targets, layers - layer - 1, relay=0, rule_target=max(targets) + 1)
        if keep is None:
            continue
        kept = ops.topk_select(cum.view(-1, m).sum(1), keep, cu_seqlens=_offsets(groups, cum.device),
                               backend=backend).kept
        rows = (kept[:, None] * m + torch.arange(m, device=kept.device)).flatten()
        hidden, cum, cos, sin = (x[rows] for x in (hidden, cum, cos, sin))
        number, window = number[kept.cpu()], window[kept.cpu()]
        deepstack = [features[kept] for features in deepstack]
        groups = keep
    number, order = number.sort()  # each image's groups ascending, images in order
    order = order.to(hidden.device)
    hidden = hidden.view(-1, m, hidden.shape[-1])[order].flatten(0, 1)
    totals = torch.tensor([t * h * w // m for t, h, w in grid_list])
    starts = (totals.cumsum(0) - totals).repeat_interleave(torch.tensor(groups))
    return hidden, (number - starts).split(groups), [features[order] for features in deepstack]


def group_positions(keep_groups: Tensor, grid: list[int], merge: int) -> Tensor:
    """(T_g, 3) int64: each kept group's M-RoPE (t, h, w) offset from its image's first position."""
    h, w = grid[1] // merge, grid[2] // merge
    g = keep_groups.cpu()
    return torch.stack([g // (h * w), g // w % h, g % w], dim=1)

"""Naive, independent float64 oracle of FlowCut's InternVL recipe (docs/semantics.md), nothing shared with the
`flowcut_kernels` package; built on oracle/flowcut.py (scores, prune count) and the model's weights.

Per image of n tiles: each tile's InternViT layers written out in float64 on its CLS row and its patches in raster
order (no reordering); a group is the 2 × 2 block of patches pixel shuffle turns into one token (group (gy, gx) holds
the patches (y, x) with y // 2 = gy, x // 2 = gx); layers 0 … L − 2 are scored while a tile has more groups than it
keeps (relay = the tile's CLS query); a group's score is the sum of its patches' S_cum. Tile j keeps f_j = K // n
groups, one more for the last K % n tiles; a prune step (rpl = L − 2 − ℓ even) drops from every tile of the image the
largest prune count any of them gives (its groups, target K // n + 1), each keeping at least f_j; rpl = 0 keeps f_j.
The last layer runs on the kept rows; each kept group's 4 patches concatenated in raster order, then the projector.

Language model: the stock decoder in float64, fed the oracle's embeddings (each image's tokens tile by tile in its
placeholders), positions counting each prompt's real tokens.
"""
import copy

import torch

from oracle.flowcut import naive_flow_scores, naive_prune_count
from oracle.vlm import placeholder_logits, prenorm_layer


def internvit_layer(layer, x):
    """One InternViT layer on x (1, S, C) float64 → (out, q, k, v (1, H, S, D), scale)."""
    attn = layer.attention
    return prenorm_layer(x, attn.num_heads, layer.layernorm_before, (attn.q_proj, attn.k_proj, attn.v_proj),
                         attn.projection_layer, layer.layernorm_after, layer.mlp, (attn.q_norm, attn.k_norm),
                         (layer.lambda_1.double(), layer.lambda_2.double()))


def tile_shares(target, tiles):
    base, extra = divmod(target, tiles)
    return [base + (1 if j >= tiles - extra else 0) for j in range(tiles)]


@torch.no_grad()
def naive_image(model, tiles, target):
    """One image's tiles (n, 3, S, S) → its K = target tokens (K, C_text) float64 and their (tile, group) (K, 2)."""
    core = model.model
    tower = core.vision_tower
    side = tower.config.image_size[0] // tower.config.patch_size[0]
    y, x = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    group_of = (y // 2) * (side // 2) + x // 2  # of each patch, raster order
    n = len(tiles)
    finals, base = tile_shares(target, n), target // n
    embeddings = copy.deepcopy(tower.embeddings).double()
    states = [embeddings(tile[None].double()) for tile in tiles]
    groups = [group_of.clone() for _ in range(n)]
    cums = [None] * n
    layers = tower.encoder.layer
    last = len(layers) - 1
    for i in range(last):
        rpl = last - i - 1
        prunes = []
        for j in range(n):
            states[j], q, k, v, scale = internvit_layer(layers[i], states[j])
            live = len(groups[j].unique()) > finals[j]
            if live:
                cums[j], hn, _ = naive_flow_scores(q[:, :, 0], k, v, cums[j], scale, has_cls=True)
            count = len(groups[j].unique())
            prunes.append(naive_prune_count(hn, count, base + 1, rpl) if live and rpl > 0 else 0)
        if rpl % 2:
            continue
        for j in range(n):
            count = len(groups[j].unique())
            keep = finals[j] if rpl == 0 else max(count - max(prunes), finals[j])
            if keep >= count:
                continue
            score = {int(g): float(cums[j][0, groups[j] == g].sum()) for g in groups[j].unique()}
            best = sorted(score, key=lambda g: (-score[g], g))[:keep]
            rows = torch.tensor([r for r in range(len(groups[j])) if int(groups[j][r]) in best])
            states[j] = torch.cat((states[j][:, :1], states[j][:, 1 + rows]), 1)
            cums[j], groups[j] = cums[j][:, rows], groups[j][rows]
    tokens, kept = [], []
    layernorm = copy.deepcopy(tower.layernorm).double()
    for j in range(n):
        out = layernorm(internvit_layer(layers[last], states[j])[0])[0, 1:]
        for g in groups[j].unique():  # ascending; the group's patches are in raster order
            tokens.append(out[groups[j] == g].flatten())
            kept.append((j, int(g)))
    return copy.deepcopy(core.multi_modal_projector).double()(torch.stack(tokens)), torch.tensor(kept)


@torch.no_grad()
def naive_logits(model, input_ids, mask, pixel_values, tiles, target):
    """Last-position logits (B, V) float64 of FlowCut on an InternVLForConditionalGeneration whose images have
    ``tiles`` tiles each (in prompt order); also each image's kept (tile, group) pairs."""
    images = [naive_image(model, chunk, target) for chunk in pixel_values.split(tiles)]
    rows = torch.cat([tokens for tokens, _ in images])
    return placeholder_logits(model, input_ids, mask, rows), [kept for _, kept in images]

"""Naive, independent float64 oracle of FlowCut's Gemma 3 recipe (docs/semantics.md), nothing shared with the
`flowcut_kernels` package; built on oracle/flowcut.py (scores, prune count) and the model's weights.

Per image: the SigLIP layers written out in float64 on the patches in their raster order (no reordering); a window
is the k × k block of patches the projector averages into one token (window (wy, wx) holds the patches (y, x) with
y // k = wy, x // k = wx); layers 0 … L − 2 are scored with relay = the mean query of the image's current patches;
a window's score is the sum of its patches' S_cum; a prune step (rpl = L − 2 − ℓ even) keeps whole windows —
K at rpl = 0, before it max(G − prune, K) with prune the prune count of G windows and target K + 1; the best windows,
ties to the lower window number; the last layer runs on the kept patches; post-layernorm; each kept window's mean;
Gemma's RMSNorm (x / rms · (1 + w)); the projection.

Language model: the stock decoder in float64, fed the oracle's embeddings (the image tokens in the placeholders, in
window order) and the oracle's own attention masks: a query attends to the real keys before it, and to every token of
its own image (a run of consecutive image tokens) also after it; positions count each prompt's real tokens.
"""
import copy

import torch
import torch.nn.functional as F

from oracle.flowcut import naive_group_prune
from oracle.vlm import placeholder_logits, prenorm_layer


def siglip_layer(layer, x):
    """One SigLIP encoder layer on x (1, S, C) float64 → (out, q, k, v (1, H, S, D), scale)."""
    attn = layer.self_attn
    return prenorm_layer(x, attn.num_heads, layer.layer_norm1, (attn.q_proj, attn.k_proj, attn.v_proj),
                         attn.out_proj, layer.layer_norm2, layer.mlp)


def window_of(patches_per_side, kernel):
    """(s²,) the window (raster over the t × t pooled grid) of each patch (raster over the s × s grid)."""
    y, x = torch.arange(patches_per_side).repeat_interleave(patches_per_side), torch.arange(patches_per_side).repeat(
        patches_per_side)
    return (y // kernel) * (patches_per_side // kernel) + x // kernel


@torch.no_grad()
def naive_image(model, pixels, target):
    """One image (3, S, S) → its K = target tokens (K, C_text) float64 and kept windows (K,) ascending."""
    core = model.model
    tower = core.vision_tower
    tower = getattr(tower, "vision_model", tower)
    projector = core.multi_modal_projector
    side = tower.config.image_size // tower.config.patch_size
    tokens = int(core.config.mm_tokens_per_image ** 0.5)
    kernel = side // tokens
    x = copy.deepcopy(tower.embeddings).double()(pixels[None].double())
    window = window_of(side, kernel)
    layers = tower.encoder.layers
    last = len(layers) - 1
    cum = None
    for i in range(last):
        windows = window.unique()
        x, q, k, v, scale = siglip_layer(layers[i], x)
        cum, keep = naive_group_prune(q, k, v, cum, scale, len(windows), target, last - i - 1)
        if keep is None:
            continue
        score = {int(w): float(cum[0, window == w].sum()) for w in windows}
        best = sorted(score, key=lambda w: (-score[w], w))[:keep]
        rows = torch.tensor([j for j in range(len(window)) if int(window[j]) in best])
        x, cum, window = x[:, rows], cum[:, rows], window[rows]
    x = siglip_layer(layers[last], x)[0]
    post = tower.post_layernorm
    x = F.layer_norm(x, x.shape[-1:], post.weight.double(), post.bias.double(), post.eps)[0]
    kept = window.unique()
    pooled = torch.stack([x[window == w].mean(0) for w in kept])
    norm = projector.mm_soft_emb_norm
    normed = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.double())
    return normed @ projector.mm_input_projection_weight.double(), kept


def attention_masks(mask, image, window):
    """(B, 1, L, L) additive float64 masks {"full_attention", "sliding_attention"}: real keys before the query, and
    every token of the query's own image run; sliding layers also need q − kv < window."""
    B, L = mask.shape
    q, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
    run = torch.cumsum(image & ~F.pad(image, (1, 0))[:, :-1], dim=1)  # the image run each token is in
    same = image[:, :, None] & image[:, None, :] & (run[:, :, None] == run[:, None, :])
    full = ((kv <= q)[None] | same) & mask.bool()[:, None, :]
    sliding = full & (q - kv < window)[None]
    low = torch.finfo(torch.float64).min
    return {name: torch.zeros(B, 1, L, L, dtype=torch.float64).masked_fill(~m[:, None], low)
            for name, m in (("full_attention", full), ("sliding_attention", sliding))}


@torch.no_grad()
def naive_logits(model, input_ids, mask, pixel_values, target):
    """Last-position logits (B, V) float64 of FlowCut on a Gemma3ForConditionalGeneration; also the kept windows of
    each image (in prompt order)."""
    images = [naive_image(model, pixels, target) for pixels in pixel_values]
    rows = torch.cat([tokens for tokens, _ in images])
    image = input_ids == model.config.image_token_id
    masks = attention_masks(mask, image, model.config.get_text_config().sliding_window)
    return placeholder_logits(model, input_ids, mask, rows, masks), [kept for _, kept in images]

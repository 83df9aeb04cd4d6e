"""Float64 oracle of FlowCut on ViT / DINOv2 / DINOv2-with-registers towers (docs/semantics.md, model recipes).

Each layer is written out (pre-norm attention with its probabilities built in full, layer scales for DINOv2,
the row-wise MLP modules), for the layouts of transformers 5.0 and 5.25. The registers (rows 1 … R) run through
every layer and stay; the scores are those of the CLS row and the patches alone (the registers' rows and columns
taken out before the softmaxes), the prune keeps the CLS row, the registers and the best patches.
"""
import copy

import torch
import torch.nn.functional as F

from oracle.flowcut import naive_prune_count, naive_select_gather, scores_from_attention


def _layers(model):
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def _parts(layer):
    """(norm1, q, k, v, o, norm2, mlp(x), scale1, scale2) of a ViT or DINOv2 layer in either layout."""
    attn = layer.attention
    if hasattr(attn, "q_proj"):  # 5.25
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    else:  # 5.0: self-attention and output projection beside it
        q, k, v, o = attn.attention.query, attn.attention.key, attn.attention.value, attn.output.dense
    if hasattr(layer, "norm1"):  # DINOv2
        return (layer.norm1, q, k, v, o, layer.norm2, layer.mlp,
                layer.layer_scale1.lambda1, layer.layer_scale2.lambda1)
    if hasattr(layer, "intermediate"):  # ViT 5.0
        def mlp(x):
            return layer.output.dense(layer.intermediate(x))
    else:
        mlp = layer.mlp
    return layer.layernorm_before, q, k, v, o, layer.layernorm_after, mlp, None, None


def eager_vit_layer(layer, x, heads):
    """One layer on x (B,S,C) float64. Returns (out, q, k, v (B,H,S,D), scale)."""
    norm1, qp, kp, vp, op, norm2, mlp, s1, s2 = _parts(layer)
    B, S, C = x.shape
    D = C // heads
    scale = D ** -0.5
    h = norm1(x)
    q, k, v = (F.linear(h, p.weight, p.bias).view(B, S, heads, D).transpose(1, 2) for p in (qp, kp, vp))
    probs = torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1)
    attended = F.linear((probs @ v).transpose(1, 2).reshape(B, S, C), op.weight, op.bias)
    x = x + (attended * s1 if s1 is not None else attended)
    fed = mlp(norm2(x))
    x = x + (fed * s2 if s2 is not None else fed)
    return x, q, k, v, scale


@torch.no_grad()
def naive_vit_encode(model, pixel_values, target_num, feature_layer=-1, registers=0):
    """FlowCut (batch rule) on a ViT/DINOv2 model in float64.

    Returns out (B, 1 + R + target_num, C) feature-layer output (CLS, registers, kept patches), keep_indices
    (B, target_num), tokens_per_layer (registers included).
    """
    model = copy.deepcopy(model).double()
    heads = model.config.num_attention_heads
    layers = _layers(model)
    Fl = len(layers) + feature_layer
    T = target_num + 1
    R = registers
    x = model.embeddings(pixel_values.double())
    B, S, C = x.shape
    index_map = torch.arange(S - 1 - R, dtype=torch.int64).repeat(B, 1)
    cum = None
    tokens = []
    for i in range(Fl):
        S = x.shape[1]
        tokens.append(S)
        x, q, k, v, scale = eager_vit_layer(layers[i], x, heads)
        rows = [0] + list(range(1 + R, S))  # the CLS row and the patches: what is scored
        rpl = Fl - i - 1
        if S - R > T:
            probs = torch.softmax(scale * (q[:, :, rows] @ k[:, :, rows].transpose(-1, -2)), dim=-1)
            cum, hn, _ = scores_from_attention(probs, v[:, :, rows], cum)
            if rpl % 2 == 0:
                keep = T if rpl == 0 else max(S - R - naive_prune_count(hn, S - R - 1, T, rpl), T)
                kept, cum, index_map = naive_select_gather(x[:, rows], cum, index_map, keep)
                x = torch.cat((kept[:, :1], x[:, 1:1 + R], kept[:, 1:]), 1)
    tokens.append(x.shape[1])
    x = eager_vit_layer(layers[Fl], x, heads)[0]
    return x, index_map, tokens


def final_layernorm(model, out):
    """The stock model's final layernorm, in float64."""
    return copy.deepcopy(model.layernorm).double()(out)

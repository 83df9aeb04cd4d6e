"""Float64 pieces the VLM oracles share (Gemma 3, InternVL), nothing shared with the `flowcut_kernels` package: a
pre-norm ViT layer written out from its weights, and the language model fed an oracle's image tokens."""
import copy

import torch
import torch.nn.functional as F


def linear(module, h):
    """``module`` (an nn.Linear) on h in float64."""
    out = h @ module.weight.double().T
    return out + module.bias.double() if module.bias is not None else out


def prenorm_layer(x, heads, norm1, projections, out_proj, norm2, mlp, qk_norm=None, scales=(1.0, 1.0)):
    """One pre-norm ViT layer on x (1, S, C) float64 → (out, q, k, v (1, H, S, D), scale).

    norm1, norm2: LayerNorms; projections: the q, k, v nn.Linears; out_proj: the attention's output nn.Linear; mlp:
    the row-wise MLP module; qk_norm: (q_norm, k_norm) RMSNorms on the projected q, k (InternViT), or None; scales:
    the two residual branches' layer scales (InternViT's lambda_1, lambda_2)."""
    _, S, C = x.shape
    D = C // heads
    scale = D ** -0.5

    def norm(module, h):
        return F.layer_norm(h, (C,), module.weight.double(), module.bias.double(), module.eps)

    def rms(module, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon) * module.weight.double()

    h = norm(norm1, x)
    q, k, v = (linear(p, h) for p in projections)
    if qk_norm is not None:
        q, k = rms(qk_norm[0], q), rms(qk_norm[1], k)
    q, k, v = (t.view(1, S, heads, D).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    x = x + scales[0] * linear(out_proj, (probs @ v).transpose(1, 2).reshape(1, S, C))
    x = x + scales[1] * copy.deepcopy(mlp).double()(norm(norm2, x))
    return x, q, k, v, scale


@torch.no_grad()
def placeholder_logits(model, input_ids, mask, rows, attention_mask=None):
    """Last-position logits (B, V) float64 of a ``*ForConditionalGeneration`` ``model`` run in float64 with its
    image placeholders' embeddings replaced, row-major, by ``rows`` (N, C_text); positions count each prompt's real
    tokens; ``attention_mask``: the decoder's mask (default ``mask``, (B, L))."""
    reference = copy.deepcopy(model).double()
    image = input_ids == model.config.image_token_id
    embeds = reference.get_input_embeddings()(input_ids).clone()
    assert int(image.sum()) == len(rows), (int(image.sum()), rows.shape)
    embeds[image] = rows
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = reference.model.language_model(inputs_embeds=embeds, position_ids=positions,
                                         attention_mask=mask if attention_mask is None else attention_mask)
    return reference.lm_head(out.last_hidden_state[:, -1])

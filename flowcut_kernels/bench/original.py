"""Original-style FlowCut: the published approach, re-implemented as a speed baseline.

The published FlowCut code patches the CLIP vision tower of LLaVA so that every layer runs with
*eager* attention and returns its full attention probabilities (``output_attentions=True``); the
scores are then computed in Python from the CLS row of those S×S probabilities and from the
value states, the prune count is read on the host at every prune step, and the tower still runs
every layer (LLaVA then takes ``hidden_states[-2]``). This module does the same, written from the
semantics of docs/semantics.md (not copied): same criteria, same schedule, same tokens as
:func:`flowcut_kernels.encode` — only the way it gets there is the slow, original one:

- each layer builds the (B, H, S, S) attention probabilities explicitly (matmul, float32 softmax,
  matmul), as eager attention with ``output_attentions=True`` does, and, like ``output_attentions``, all
  layers' probabilities are kept until the forward returns (with all hidden states, as
  ``output_hidden_states=True`` keeps them);
- the layer score is plain PyTorch on the CLS row ``probs[:, :, 0, :]`` and on the values;
- one host sync per prune step (the entropies are read with ``.tolist()`` to size the step);
- all L layers run, including those after the feature layer F, whose outputs are unused.

Shapes: B images, S tokens (CLS first), N = S − 1 candidates, H heads, D head dim, C = H·D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _vision_core(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``pre_layrnorm``, ``encoder.layers``, ``post_layernorm``."""
    core = model
    while not hasattr(core, "pre_layrnorm"):
        core = core.vision_model
    return core


def eager_layer(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One CLIP encoder layer with eager attention.

    Args:
        layer: a ``CLIPEncoderLayer``.
        hidden: (B, S, C) input.

    Returns:
        hidden_out (B, S, C), probs (B, H, S, S) attention probabilities (in the input dtype, as
        eager attention returns them), values (B, H, S, D).
    """
    attn = layer.self_attn
    batch, seq, channels = hidden.shape
    shape = (batch, seq, attn.num_heads, attn.head_dim)
    x = layer.layer_norm1(hidden)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, channels)
    hidden = hidden + attn.out_proj(context)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, probs, v


def layer_score(probs: Tensor, values: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
    """FlowCut's layer score from the attention probabilities (CLS variant, docs/semantics.md signals 1–7).

    Args:
        probs: (B, H, S, S) attention probabilities; row 0 is the CLS query.
        values: (B, H, S, D) value states.
        prev: (B, N) float32 cumulative score of the previous scored layer, or None.

    Returns:
        cum (B, N) float32 new cumulative score, entropy (B,) float32 normalised entropy of the
        CLS attention over the candidates.
    """
    cls_attn = probs[:, :, 0, :].float().mean(dim=1)[:, 1:]  # A: (B, N)
    v = values.float()
    similarity = torch.matmul(v[:, :, :1], v.transpose(-1, -2)).squeeze(2)  # (B, H, S): v_h[0]·v_h[j]
    semantic = similarity.softmax(dim=-1).mean(dim=1)[:, 1:]  # Sm: (B, N)
    density = v.mean(dim=1).abs().sum(dim=-1)[:, 1:]  # ρ: (B, N)
    p = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    score = (p + semantic / semantic.sum(dim=-1, keepdim=True)) * density
    cum = score if prev is None else 0.5 * prev + 0.5 * score
    n = p.shape[-1]
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    entropy = -plogp.sum(dim=-1) / math.log(n) if n > 1 else torch.zeros_like(p[:, 0])
    return cum, entropy


def tokens_to_prune(entropy: Tensor, n: int, target: int, steps_left: int) -> int:
    """The schedule's prune count, computed on the host (one sync: the entropies come to Python)."""
    excess = n - (target - 1)
    if steps_left == 0:
        return excess
    worst = max(1.0 - h * h for h in entropy.tolist())
    return max(round(excess / math.sqrt(steps_left) * worst), 0)  # round(): half to even


def prune(hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep CLS and the keep − 1 best candidates (ties: lower index first), in ascending order.

    hidden (B, S, C), cum and index_map (B, N) → (B, keep, C), (B, keep − 1), (B, keep − 1).
    """
    ranked = torch.argsort(cum, dim=-1, descending=True, stable=True)[:, : keep - 1]
    kept = ranked.sort(dim=-1).values
    rows = torch.cat([torch.zeros_like(kept[:, :1]), kept + 1], dim=1)
    batch_rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    return hidden[batch_rows, rows], cum.gather(1, kept), index_map.gather(1, kept)


@torch.no_grad()
def encode_original(
    model: nn.Module, pixel_values: Tensor, target_num: int, feature_layer: int = -2
) -> tuple[Tensor, Tensor, list[int]]:
    """Original-style FlowCut through a HF CLIP vision model.

    Args:
        model: a HF ``CLIPVisionModel`` (any attention implementation: the layers here are eager).
        pixel_values: (B, 3, H, W).
        target_num: patches kept, 1 ≤ target_num < N₀.
        feature_layer: negative index of the feature layer, like LLaVA's ``vision_feature_layer``.

    Returns:
        features (B, target_num, C) — ``hidden_states[feature_layer]`` without its CLS row;
        keep_indices (B, target_num) int64 ascending original patch indices;
        tokens_per_layer — tokens each of the L layers processed (all of them run).
    """
    core = _vision_core(model)
    layers = core.encoder.layers
    feature_idx = len(layers) + feature_layer
    target = target_num + 1
    hidden = core.pre_layrnorm(core.embeddings(pixel_values))
    batch, seq, _ = hidden.shape
    index_map = torch.arange(seq - 1, device=hidden.device).expand(batch, seq - 1)
    hidden_states, attentions = [hidden], []
    cum = None
    tokens = []
    for i, layer in enumerate(layers):
        seq = hidden.shape[1]
        tokens.append(seq)
        hidden, probs, values = eager_layer(layer, hidden)
        hidden_states.append(hidden)
        attentions.append(probs)
        if i >= feature_idx or seq <= target:
            continue
        cum, entropy = layer_score(probs, values, cum)
        steps_left = feature_idx - i - 1
        if steps_left % 2 == 0:
            keep = max(seq - tokens_to_prune(entropy, seq - 1, target, steps_left), target)
            if keep < seq:
                hidden, cum, index_map = prune(hidden, cum, index_map, keep)
    core.post_layernorm(hidden[:, 0])  # the pooled output, as the stock forward computes it
    return hidden_states[feature_layer][:, 1:], index_map, tokens

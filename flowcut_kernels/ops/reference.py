"""FlowCut in plain PyTorch: the reference every backend is checked against.

Read next to docs/semantics.md and the paper (FlowCut, arXiv 2505.19536). Notation: B images, H heads,
S tokens (the relay/CLS token first when ``has_cls``), D head dim, C = H·D hidden size,
N candidate tokens (S − 1 with a CLS token, S without). Every reduction runs in float32 (float64 for
float64 inputs); inputs may have any strides. No input validation here: the
public wrappers in :mod:`flowcut_kernels.ops` do that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _head_mean_softmax(logits: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """Head-mean softmax over all S tokens, on the candidates, and the same normalised over the candidates.

    logits: (B, H, S), relay row first when ``first`` is 1. Returns A (B, N) = mean_h softmax_h[first:] and
    p (B, N) = A / Σ A, computed without dividing underflowed values: per head, the candidates' own softmax
    (relative to their log-sum-exp), weighted by exp(lse_cand_h − lse_all_h − max over heads). p stays exact
    when the relay takes almost all the mass (A then underflows to 0, its true value in float32).
    """
    cand = logits[..., first:]
    lse_cand = cand.logsumexp(dim=-1)  # (B, H)
    lse_all = torch.logaddexp(lse_cand, logits[..., 0]) if first else lse_cand
    attn = (cand - lse_all.unsqueeze(-1)).exp().mean(dim=1)
    log_share = lse_cand - lse_all  # log of the candidates' share of head h's mass, <= 0
    weight = (log_share - log_share.amax(dim=1, keepdim=True)).exp()  # (B, H), the largest is 1
    within = (cand - lse_cand.unsqueeze(-1)).exp()  # (B, H, N), each head's softmax over the candidates
    p = torch.einsum("bh,bhn->bn", weight, within) / weight.sum(dim=1, keepdim=True)
    return attn, p


def flow_scores(
    q_relay: Tensor,
    k: Tensor,
    v: Tensor,
    prev: Tensor | None,
    scale: float,
    has_cls: bool = True,
    semantic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's FlowCut scores.

    Args:
        q_relay: (B, H, D) relay query — q of the CLS row, or the mean q over the S tokens.
        k, v: (B, H, S, D) the layer's own keys and values.
        prev: (B, N) float32 cumulative score of the previous scored layer, or None.
        scale: the model's attention scale (D^-1/2 for CLIP/SigLIP).
        has_cls: CLS variant (row 0 is the relay and no candidate) or mean variant.
        semantic: add the CLS-value similarity term (CLS variant only; the mean variant has none).

    Returns:
        cum (B, N) float32 — the new cumulative score S_cum,
        entropy (B,) float32 — the normalised entropy Hn of the candidates' attention,
        attn (B, N) float32 — A, the head-mean relay attention over the candidates.
    Computed in float32 (float64 for float64 inputs).
    """
    acc = torch.promote_types(k.dtype, torch.float32)
    q, k, v = q_relay.to(acc), k.to(acc), v.to(acc)
    first = 1 if has_cls else 0

    # Attention strength: each head's relay row, softmax over all S tokens, mean over heads; p = A / ΣA.
    attn, p = _head_mean_softmax(scale * torch.einsum("bhd,bhsd->bhs", q, k), first)

    # Information density: L1 norm of the head-averaged value of each token.
    rho = v.mean(dim=1).abs().sum(dim=-1)[:, first:]

    if has_cls:
        score = p
        if semantic:
            # Semantic relevance: the CLS value against every value, softmax without scale, normalised.
            score = score + _head_mean_softmax(torch.einsum("bhd,bhsd->bhs", v[:, :, 0], v), first)[1]
        score = score * rho
    else:
        score = attn * rho

    # Cumulative flow: halve the history, add half the new layer.
    cum = score if prev is None else 0.5 * prev.to(acc) + 0.5 * score

    # Normalised entropy of the candidates' attention (0·ln 0 = 0; 0 for a single candidate).
    n = attn.shape[-1]
    entropy = -torch.xlogy(p, p).sum(dim=-1)
    entropy = entropy / math.log(n) if n > 1 else torch.zeros_like(entropy)
    f32 = torch.float32
    return cum.to(f32).contiguous(), entropy.to(f32), attn.to(f32).contiguous()


def select_gather(
    hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int, has_cls: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the relay row and the top-scoring candidates, in their original order.

    Args:
        hidden: (B, S, C) hidden states, relay row first when ``has_cls``.
        cum: (B, N) float32 cumulative scores of the candidates.
        index_map: (B, N) int64 original patch index of each candidate.
        keep: rows to keep, the relay row included when ``has_cls``.

    Returns:
        hidden_out (B, keep, C), cum_out (B, K) float32, index_out (B, K) int64, with
        K = keep − 1 (CLS variant) or keep; kept candidates in ascending original order.
        Equal scores keep the lower index first.
    """
    n_keep = keep - 1 if has_cls else keep
    # A stable descending sort breaks ties by lower index; then restore the original order.
    ranked = torch.sort(cum, dim=-1, descending=True, stable=True).indices
    kept = ranked[:, :n_keep].sort(dim=-1).values

    if has_cls:  # the relay row first, then candidate j as row j + 1
        rows = torch.cat([kept.new_zeros(kept.shape[0], 1), kept + 1], dim=1)
    else:
        rows = kept
    hidden_out = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return hidden_out, cum.gather(1, kept), index_map.gather(1, kept)


def prune_count(entropy: Tensor, n_candidates: int, target: int, steps_left: int) -> int:
    """How many tokens a prune step drops (docs/semantics.md, "Schedule").

    Args:
        entropy: (B,) normalised entropy Hn of this layer's attention, one per image.
        n_candidates: N, the candidates in the current layer.
        target: T, the final keep target (relay row included in the CLS variant).
        steps_left: rpl, the prune steps left after this one (0 for the last).

    Returns:
        The number of tokens to drop: N − (T − 1) on the last step, else
        round_half_to_even(max over the batch of (N − (T − 1)) / √rpl · (1 − Hn²)).
        The caller keeps max(S − prune, T) rows.
    """
    excess = n_candidates - (target - 1)
    if steps_left == 0:
        return excess
    budget = excess / math.sqrt(steps_left) * (1.0 - entropy.double() ** 2)
    return max(round(budget.max().item()), 0)

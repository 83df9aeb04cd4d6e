"""FlowCut in plain PyTorch: the reference every backend is checked against.

Read next to docs/semantics.md and the paper (FlowCut, arXiv 2505.19536). Notation: B images, H heads,
S tokens (the relay/CLS token first when ``has_cls``), D head dim, C = H·D hidden size,
N candidate tokens (S − 1 with a CLS token, S without). Every reduction runs in float32 (float64 for
float64 inputs); inputs may have any strides. No input validation here: the
public wrappers in :mod:`flowcut_kernels.ops` and the ops over these functions (:mod:`.library`) check their
inputs with :mod:`.validate` first.
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
    entropy = normalised_entropy(p)
    f32 = torch.float32
    return cum.to(f32).contiguous(), entropy.to(f32), attn.to(f32).contiguous()


def normalised_entropy(p: Tensor) -> Tensor:
    """Hn = (−Σ p ln p) / ln N over the last axis of p (B, N) (0·ln 0 = 0; 0 when N = 1), without cancellation.

    A p_j ≤ ½ contributes −p_j ln p_j as it is. A p_m > ½ — one-hot rows put 1 − 1e-10 there, which rounds
    to 1 in float32 — takes ln p_m = log1p(−r), r = Σ of the other p_j (its exact complement, summed from small
    values), so its share −p_m ln p_m ≈ r is kept instead of lost to rounding. (If rounding leaves two values
    above ½, their own logs are used.)
    """
    n = p.shape[-1]
    if n <= 1:
        return torch.zeros_like(p[..., 0])
    big = p > 0.5
    small = p.masked_fill(big, 0.0)
    rest = small.sum(dim=-1)
    large = p - small  # the p_j > ½, else 0
    direct = -torch.xlogy(large, large).sum(dim=-1)
    complement = -large.sum(dim=-1) * torch.log1p(-rest)
    h = -torch.xlogy(small, small).sum(dim=-1) + torch.where(big.sum(dim=-1) == 1, complement, direct)
    return h / math.log(n)


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
    kept, rows = kept_rows(cum, keep, has_cls)
    hidden_out = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return hidden_out, cum.gather(1, kept), index_map.gather(1, kept)


def kept_rows(cum: Tensor, keep: int, has_cls: bool = True) -> tuple[Tensor, Tensor]:
    """Which candidates and rows :func:`select_gather` keeps: kept (B, K) candidate indices and rows (B, keep)
    hidden rows (the relay row 0 first with CLS), ascending. Ties keep the lower index; NaN ranks first."""
    n_keep = keep - 1 if has_cls else keep
    # A stable descending sort breaks ties by lower index; then restore the original order.
    ranked = torch.sort(cum, dim=-1, descending=True, stable=True).indices
    kept = ranked[:, :n_keep].sort(dim=-1).values
    if not has_cls:
        return kept, kept
    return kept, torch.cat([kept.new_zeros(kept.shape[0], 1), kept + 1], dim=1)  # candidate j is row j + 1


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


# --- Packed (varlen) batches: images of different lengths along one token axis --------------------------


def _segments(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """(start, length) of each image from cu_seqlens (B + 1,)."""
    cu = cu_seqlens.tolist()
    return [(cu[b], cu[b + 1] - cu[b]) for b in range(len(cu) - 1)]


def candidate_offsets(cu_seqlens: Tensor, has_cls: bool) -> Tensor:
    """cu_seqlens of the candidates: image b's candidates are rows cu[b] − b … (with a CLS row each)."""
    return cu_seqlens - torch.arange(cu_seqlens.numel(), device=cu_seqlens.device, dtype=cu_seqlens.dtype) * int(
        has_cls
    )


def flow_scores_varlen(
    q_relay: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    prev: Tensor | None,
    scale: float,
    has_cls: bool = True,
    semantic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`flow_scores` of each image of a packed batch, on its own segment.

    Args:
        q_relay: (B, H, D) each image's relay query.
        k, v: (T, H, D) the keys and values of all images, image b in rows cu_seqlens[b] … cu_seqlens[b+1].
        cu_seqlens: (B + 1,) int32/int64 row offsets, increasing, from 0 to T.
        prev: (T_c,) float32 packed cumulative scores of the candidates (T_c = T − B with CLS rows, else T),
            or None.

    Returns:
        cum (T_c,) float32 packed like the candidates, entropy (B,) float32, attn (T_c,) float32.
    """
    cums, entropies, attns = [], [], []
    cand = candidate_offsets(cu_seqlens, has_cls).tolist()
    for b, (start, length) in enumerate(_segments(cu_seqlens)):
        kb = k[start : start + length].transpose(0, 1).unsqueeze(0)  # (1, H, S_b, D)
        vb = v[start : start + length].transpose(0, 1).unsqueeze(0)
        pb = None if prev is None else prev[cand[b] : cand[b + 1]].unsqueeze(0)
        cum, entropy, attn = flow_scores(q_relay[b : b + 1], kb, vb, pb, scale, has_cls, semantic)
        cums.append(cum[0])
        entropies.append(entropy)
        attns.append(attn[0])
    return torch.cat(cums), torch.cat(entropies), torch.cat(attns)


def select_gather_varlen(
    hidden: Tensor, cum: Tensor, index_map: Tensor, cu_seqlens: Tensor, keep: list[int], has_cls: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`select_gather` of each image of a packed batch, with its own keep count.

    Args:
        hidden: (T, C) rows of all images, packed by cu_seqlens (B + 1,).
        cum, index_map: (T_c,) packed candidates' scores (float32) and original indices (int64).
        keep: B rows to keep per image (the relay row included with CLS).

    Returns:
        hidden_out (Σ keep, C), cum_out and index_out (Σ K_b,) packed, and cu_seqlens_out (B + 1,) of
        hidden_out, in cu_seqlens' dtype.
    """
    outs = ([], [], [])
    cand = candidate_offsets(cu_seqlens, has_cls).tolist()
    for b, (start, length) in enumerate(_segments(cu_seqlens)):
        got = select_gather(
            hidden[start : start + length].unsqueeze(0),
            cum[cand[b] : cand[b + 1]].unsqueeze(0),
            index_map[cand[b] : cand[b + 1]].unsqueeze(0),
            keep[b],
            has_cls,
        )
        for out, part in zip(outs, got):
            out.append(part[0])
    counts = torch.tensor([0, *keep], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.cat(outs[0]), torch.cat(outs[1]), torch.cat(outs[2]), counts.cumsum(0, dtype=cu_seqlens.dtype)


def kept_rows_varlen(cum: Tensor, cu_seqlens: Tensor, keep: list[int], has_cls: bool = True) -> Tensor:
    """The rows of a packed hidden (T, C) that :func:`select_gather_varlen` keeps: (Σ keep,) int64, in output order."""
    cand = candidate_offsets(cu_seqlens, has_cls).tolist()
    rows = [
        start + kept_rows(cum[cand[b] : cand[b + 1]].unsqueeze(0), keep[b], has_cls)[1][0]
        for b, (start, _) in enumerate(_segments(cu_seqlens))
    ]
    return torch.cat(rows)


def prune_counts(entropy, n_candidates: list[int], target: int, steps_left: int) -> list[int]:
    """:func:`prune_count` of each image alone (a per-image schedule): B ints, from one host read of ``entropy``
    ((B,) tensor, or its values already read as floats)."""
    excess = [n - (target - 1) for n in n_candidates]
    if steps_left == 0:
        return excess
    # the one read, then :func:`prune_count`'s float64 arithmetic per image
    values = entropy.double().tolist() if isinstance(entropy, Tensor) else list(entropy)
    return [max(round(e / math.sqrt(steps_left) * (1.0 - h * h)), 0) for e, h in zip(excess, values)]


# --- Generic primitives (other pruning methods build on these) -------------------------------------------


def attention_scores(
    q: Tensor, k: Tensor, scale: float, key_mask: Tensor | None, span_start: int, span_end: int
) -> Tensor:
    """Head- and row-mean attention of query rows over keys, the columns of one span.

    Args:
        q: (B, Hq, Q, D) query rows (any rows: a CLS row, the last prompt token, every text token).
        k: (B, Hkv, S, D) keys; Hq a multiple of Hkv (GQA: query head h reads key head h // (Hq / Hkv)).
        key_mask: (B, S) bool, True where a key may be attended (padding False), or None.
        span_start, span_end: the key columns returned, 0 ≤ start < end ≤ S.

    Returns:
        (B, end − start) float32: mean over the Hq heads and Q rows of softmax over the S keys of scale·q·k.
    """
    acc = torch.promote_types(k.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    logits = scale * torch.einsum("bhqd,bhsd->bhqs", q.to(acc), k.to(acc).repeat_interleave(group, dim=1))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))[:, span_start:span_end].float().contiguous().clone()


def text_guided_scores(
    q_relay: Tensor, v_relay: Tensor, k: Tensor, v: Tensor, segments: list[int], scale: float
) -> Tensor:
    """The language-model stage's score of the visual tokens of each image segment (docs/semantics.md).

    Args:
        q_relay: (B, Hq, D) the relay token's query (the prompt's last token), after RoPE.
        v_relay: (B, Hkv, D) the relay token's value.
        k, v: (B, Hkv, S, D) the layer's keys (after RoPE) and values; GQA as in :func:`attention_scores`.
        segments: G triples (b, start, end), flat: the visual tokens start … end − 1 of sequence b.
        scale: 1/√D.

    Returns:
        (Σ_g (end − start),) float32 scores packed segment by segment: (rel + sem)·ρ with rel, sem the
        head means of the softmaxes over the segment of scale·q_t·k_j and scale·v_t·v_j, ρ the L1 norm of the
        head-mean value.
    """
    acc = torch.promote_types(k.dtype, torch.float32)
    group = q_relay.shape[1] // k.shape[1]
    out = []
    for b, start, end in zip(segments[0::3], segments[1::3], segments[2::3]):
        kb = k[b, :, start:end].to(acc).repeat_interleave(group, dim=0)  # (Hq, n, D)
        vb = v[b, :, start:end].to(acc).repeat_interleave(group, dim=0)
        v_t = v_relay[b].to(acc).repeat_interleave(group, dim=0)
        rel = (scale * torch.einsum("hd,hnd->hn", q_relay[b].to(acc), kb)).softmax(-1).mean(0)
        sem = (scale * torch.einsum("hd,hnd->hn", v_t, vb)).softmax(-1).mean(0)
        rho = vb.mean(0).abs().sum(-1)
        out.append(((rel + sem) * rho).float())
    return torch.cat(out) if out else k.new_empty((0,), dtype=torch.float32)


def topk_select(
    scores: Tensor, cu_seqlens: Tensor, keep: list[int], protect: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image, the ``keep`` best unprotected rows plus every protected row; the rest are dropped.

    Args:
        scores: (T,) any float dtype, packed by cu_seqlens (B + 1,).
        keep: B ints, unprotected rows kept per image (ties: lower index; NaN ranks first).
        protect: (T,) bool rows always kept (not counted in keep), or None.

    Returns:
        kept (Σ K_b,) and dropped (Σ M_b,) int64 row indices into the T rows, ascending within each image, and
        their offsets kept_cu, dropped_cu (B + 1,) in cu_seqlens' dtype.
    """
    kept, dropped, n_kept, n_dropped = [], [], [0], [0]
    for b, (start, length) in enumerate(_segments(cu_seqlens)):
        rows = torch.arange(start, start + length, device=scores.device)
        free = rows if protect is None else rows[~protect[start : start + length]]
        ranked = free[torch.sort(scores[free], descending=True, stable=True).indices]
        chosen = ranked[: keep[b]]
        mask = torch.zeros(length, dtype=torch.bool, device=scores.device)
        mask[chosen - start] = True
        if protect is not None:
            mask |= protect[start : start + length]
        kept.append(rows[mask])
        dropped.append(rows[~mask])
        n_kept.append(n_kept[-1] + len(kept[-1]))
        n_dropped.append(n_dropped[-1] + len(dropped[-1]))

    def offsets(counts):
        return torch.tensor(counts, dtype=cu_seqlens.dtype, device=cu_seqlens.device)

    return torch.cat(kept), torch.cat(dropped), offsets(n_kept), offsets(n_dropped)


def merge_nearest(
    hidden: Tensor, keys: Tensor, kept: Tensor, dropped: Tensor, kept_cu: Tensor, dropped_cu: Tensor,
    sizes: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Merge each image's dropped rows into its most similar kept row (size-weighted mean).

    Args:
        hidden: (T, C) rows; keys: (T, Ck) what similarity is measured on (cosine; e.g. the layer's keys).
        kept, dropped: row indices into T, grouped per image by kept_cu / dropped_cu (B + 1,), as
            :func:`topk_select` returns them. An image with dropped rows needs a kept row.
        sizes: (T,) how many original tokens each row already stands for (float), or None (all 1: a mean).

    Returns:
        merged (K, C) in hidden's dtype: for kept row i, (s_i·h_i + Σ_{j→i} s_j·h_j) / (s_i + Σ_{j→i} s_j) where
        j → i when i is j's most similar kept row of its image (ties: lower index); sizes_out (K,) float32.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    size = torch.ones(hidden.shape[0], dtype=acc, device=hidden.device) if sizes is None else sizes.to(acc)
    merged, mass = [], []
    kc, dc = kept_cu.tolist(), dropped_cu.tolist()
    for b in range(len(kc) - 1):
        ki, di = kept[kc[b] : kc[b + 1]], dropped[dc[b] : dc[b + 1]]
        total = hidden[ki].to(acc) * size[ki, None]
        weight = size[ki].clone()
        if len(di):
            unit = torch.nn.functional.normalize(keys.to(acc), dim=-1)
            target = (unit[di] @ unit[ki].T).argmax(dim=-1)  # the first maximum: ties to the lower index
            total.index_add_(0, target, hidden[di].to(acc) * size[di, None])
            weight.index_add_(0, target, size[di])
        merged.append(total / weight[:, None])
        mass.append(weight)
    return torch.cat(merged).to(hidden.dtype), torch.cat(mass).float()

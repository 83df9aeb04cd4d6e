"""Triton flow_scores: one layer's FlowCut scores (docs/semantics.md, signals 1–7), dense or packed batches.

The same kernels serve both layouts. A dense batch has k, v (B, H, S, D); a packed (varlen) batch has
k, v (T, H, D) with image b on rows cu_seqlens[b] … cu_seqlens[b+1], read as a batch whose images share
one (H, T, D) slab (batch stride 0), each from its own first row and with its own length (:func:`segment`).
Scratch and outputs lie on the packed token axis in both cases: a dense image b starts at row b·S and at
candidate b·N.

Per image the kernels read q_relay, k and v once, chunk by chunk of ``BLOCK_S`` tokens:
  phase 1 (per chunk, every head): relay logits l_h[j] = scale·r_h·k_h[j], semantic logits
          v_h[0]·v_h[j] (CLS variant), ρ[j] = Σ_d |mean_h v_h[j, d]|, written to float32 scratch rows
          (H, T) and (T,), and each head's max and Σexp over the chunk's *candidates* (the relay logit
          l_h[0] is not in them; it stays in the scratch row);
  phase 2 (per image): per head, the chunk statistics merged (online softmax) into lse_cand_h, the
          log-sum-exp over the candidates, and lse_all_h = logaddexp(lse_cand_h, l_h[0]) in the CLS
          variant (= lse_cand_h in the mean variant); with d_h = lse_cand_h − lse_all_h and
          w_h = exp(d_h − max_h d_h), the normalised attention is
              p[j] = Σ_h w_h·exp(l_h[j] − lse_cand_h) / Σ_h w_h      (= A[j] / Σ_j A, never 0/0)
          and A[j] = mean_h exp(l_h[j] − lse_all_h) (it may underflow to 0 when the relay takes
          almost all the mass: its true float32 value); the semantic term p_sem likewise. Then the
          layer score ((p + p_sem)·ρ in the CLS variant, A·ρ in the mean variant), the cumulative
          update with ``prev``, chunk by chunk (:func:`_finish_chunk`), and the normalised entropy Hn of p
          from the chunks' sums (without cancellation: a p_m > ½ takes ln p_m = log1p(−Σ of the other p),
          see :func:`_entropy`).
For short images (CLIP's 577 tokens) one program per image runs both phases: one launch. When the
longest image has 2048 tokens or more and the batch at most 64 images, no program streams a whole image:
phase 1 runs over (image, chunk) programs, then a small launch per image merges its chunk statistics into
the per-head weights (O(chunks · H)), phase 2 runs over (image, chunk) programs again (reading only the
scratch, 2·H + 1 floats per token), and a last small launch per image sums the chunks' entropy terms. Both
paths share the chunk code and the entropy's summation order, so they agree bit for bit. A packed batch is
never read on the host: its longest image is taken as
T − (B − 1)·(1 + has_cls), the most rows one image can have, and its split grid has one program per
chunk slot of the packed axis (:func:`_slot_owner`). Everything accumulates in float32; every address
is computed in int64 (inputs may span > 2^31 elements).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def segment(cu_ptr, b, size, VARLEN: tl.constexpr):
    """Image b's first row on the packed axis and its row count (int64): cu[b] and cu[b+1] − cu[b] of a
    packed batch (VARLEN), else b·size and size (a dense batch of equal images laid end to end)."""
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        count = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    else:
        start = b * size
        count = tl.cast(size, tl.int64)
    return start, count


@triton.jit
def _candidate_stats(ptr, x):
    """Store max(x) and Σ exp(x − max) at ptr[0], ptr[1]; x (BLOCK_S,) is −inf off the candidates."""
    m = tl.max(x, axis=0)
    tl.store(ptr, m)
    tl.store(ptr + 1, tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)), axis=0))


@triton.jit
def _chunk_phase(
    q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr,
    b, c, start, S, T, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Phase 1 for tokens [c·BLOCK_S, (c+1)·BLOCK_S) of image b (int64 ids; S tokens from packed row start):
    logits, ρ and candidate stats.

    Stats (chunk slots, H, 4), image b's chunks from slot start // BLOCK_S + b: per head, the chunk
    candidates' max and Σexp(l − max) of the relay logits, then of the semantic logits.
    """
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    row0 = start if VARLEN else 0  # token 0's row in the image's k/v slab
    offs_s = tl.cast(c, tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_s = offs_s < S
    cand = mask_s & (offs_s >= FIRST)
    mask_sd = mask_s[:, None] & (offs_d[None, :] < D)
    k_img = k_ptr + b * sk_b + (row0 + offs_s[:, None]) * sk_s + offs_d[None, :] * sk_d
    v_img = v_ptr + b * sv_b + (row0 + offs_s[:, None]) * sv_s + offs_d[None, :] * sv_d
    stats = stat_ptr + ((start // BLOCK_S + b + c) * H) * 4
    v_sum = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for head in range(H):
        h = tl.cast(head, tl.int64)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d * sq_d, mask=offs_d < D, other=0.0).to(tl.float32)
        k = tl.load(k_img + h * sk_h, mask=mask_sd, other=0.0).to(tl.float32)
        v = tl.load(v_img + h * sv_h, mask=mask_sd, other=0.0).to(tl.float32)
        v_sum += v
        row = h * T + start + offs_s
        logit = tl.sum(k * q[None, :], axis=1) * scale
        tl.store(logit_ptr + row, logit, mask=mask_s)
        _candidate_stats(stats + h * 4, tl.where(cand, logit, float("-inf")))
        if SEMANTIC:
            v0 = tl.load(v_ptr + b * sv_b + row0 * sv_s + h * sv_h + offs_d * sv_d, mask=offs_d < D, other=0.0)
            sem = tl.sum(v * v0.to(tl.float32)[None, :], axis=1)
            tl.store(sem_ptr + row, sem, mask=mask_s)
            _candidate_stats(stats + h * 4 + 2, tl.where(cand, sem, float("-inf")))
    rho = tl.sum(tl.abs(v_sum / H), axis=1)
    tl.store(rho_ptr + start + offs_s, rho, mask=mask_s)


@triton.jit
def _candidate_lse(stats, H, n_chunks, col, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each head's log-sum-exp over the candidates, merged from the (max, Σexp) pairs at columns (col, col + 1)
    of the image's chunk stats (n_chunks, H, 4) at ``stats``: (BLOCK_H,), 0 past H."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < H
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < n_chunks) & mask_h[None, :]
        at = (offs_c[:, None] * H + offs_h[None, :]) * 4 + col
        cm = tl.load(stats + at, mask=mask, other=float("-inf"))
        cz = tl.load(stats + at + 1, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(cm, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - m_safe) + tl.sum(cz * tl.exp(cm - m_safe[None, :]), axis=0)  # rescaled to m_new
        m = m_new
    return tl.where(mask_h, m, 0.0) + tl.log(tl.where(mask_h, z, 1.0))


@triton.jit
def _head_weights(
    rows, stats, T, H, n_chunks, col, HAS_CLS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per head (BLOCK_H,): lse_cand_h, lse_all_h and w_h / Σ_h w_h (0 past H), for the image whose logit rows
    (head stride T) start at ``rows``."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < H
    lse_cand = _candidate_lse(stats, H, n_chunks, col, BLOCK_H, BLOCK_C)
    lse_all = lse_cand
    if HAS_CLS:  # logaddexp with the relay logit l_h[0]
        relay = tl.load(rows + offs_h * T, mask=mask_h, other=0.0)
        hi = tl.maximum(lse_cand, relay)
        lse_all = hi + tl.log(tl.exp(lse_cand - hi) + tl.exp(relay - hi))
    d = tl.where(mask_h, lse_cand - lse_all, float("-inf"))
    w = tl.exp(d - tl.max(d, axis=0))
    return lse_cand, lse_all, w / tl.sum(w, axis=0)


@triton.jit
def _logit_tile(rows, T, H, offs_s, cand, BLOCK_H: tl.constexpr):
    """Logit rows (head stride T, from ``rows``) at tokens offs_s: (BLOCK_H, BLOCK_S), −inf past H and off the
    candidates."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask = (offs_h[:, None] < H) & cand[None, :]
    return tl.load(rows + offs_h[:, None] * T + offs_s[None, :], mask=mask, other=float("-inf"))


@triton.jit
def _mix(x, lse, w):
    """Σ_h w_h·exp(x_h − lse_h) of a logit tile x (BLOCK_H, BLOCK_S): (BLOCK_S,)."""
    return tl.sum(w[:, None] * tl.exp(x - lse[:, None]), axis=0)


@triton.jit
def _neg_log1p_neg(r):
    """−ln(1 − r) for 0 ≤ r ≤ ½ to float32 accuracy, without forming 1 − r near 1: its series Σ_k r^k / k
    (8 terms, error < r·2^-36) below r = 1/16, −ln(1 − r) above (1 − r ≤ 15/16 is far enough from 1)."""
    series = r * (1.0 + r * (1.0 / 2 + r * (1.0 / 3 + r * (1.0 / 4 + r * (1.0 / 5 + r * (1.0 / 6 + r * (
        1.0 / 7 + r * (1.0 / 8))))))))
    return tl.where(r < 1.0 / 16, series, -tl.log(tl.maximum(1.0 - r, 1e-30)))


@triton.jit
def _image_weights(
    logits, sems, stats, T, H, n_chunks, HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per head (BLOCK_H,) of one image (logit rows from ``logits`` / ``sems``, chunk stats from ``stats``):
    lse_cand, lse_all and the normalised w of the relay logits, then lse_cand and w of the semantic logits (the
    relay ones again without SEMANTIC)."""
    lse_a, lse_all, w_a = _head_weights(logits, stats, T, H, n_chunks, 0, HAS_CLS, BLOCK_H, BLOCK_C)
    lse_s, w_s = lse_a, w_a
    if SEMANTIC:
        lse_s, _, w_s = _head_weights(sems, stats, T, H, n_chunks, 2, HAS_CLS, BLOCK_H, BLOCK_C)
    return lse_a, lse_all, w_a, lse_s, w_s


@triton.jit
def _finish_chunk(
    logits, sems, rho_ptr, prev, cum_ptr, attn_ptr, part_ptr, first_cand, start, s0, S, T, H, sp_n,
    lse_a, lse_all, w_a, lse_s, w_s,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Phase 2 for tokens s0 … s0 + BLOCK_S of one image (S tokens from packed row start, candidates from
    first_cand): p, A, p_sem, the layer score and S_cum; the chunk's entropy sums go to part_ptr[0 … 4]:
    Σ −p ln p over p ≤ ½, the same over p > ½, Σ p over p ≤ ½, Σ p over p > ½, and how many p > ½."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
    cand = (offs_s >= FIRST) & (offs_s < S)
    j = offs_s - FIRST
    x = _logit_tile(logits, T, H, offs_s, cand, BLOCK_H)
    p = _mix(x, lse_a, w_a)
    if HAS_CLS:
        a = _mix(x, lse_all, tl.where(tl.arange(0, BLOCK_H) < H, 1.0 / H, 0.0))
    else:
        a = p  # lse_all = lse_cand and w_h = 1/H: the same sum
    tl.store(attn_ptr + first_cand + j, a, mask=cand)
    big = p > 0.5
    plogp = p * tl.log(tl.where(p > 0.0, p, 1.0))  # 0·ln 0 = 0
    tl.store(part_ptr, -tl.sum(tl.where(big, 0.0, plogp), axis=0))
    tl.store(part_ptr + 1, -tl.sum(tl.where(big, plogp, 0.0), axis=0))
    tl.store(part_ptr + 2, tl.sum(tl.where(big, 0.0, p), axis=0))
    tl.store(part_ptr + 3, tl.sum(tl.where(big, p, 0.0), axis=0))
    tl.store(part_ptr + 4, tl.sum(big.to(tl.float32), axis=0))
    rho = tl.load(rho_ptr + start + offs_s, mask=cand, other=0.0)
    if HAS_CLS:
        score = p
        if SEMANTIC:
            score += _mix(_logit_tile(sems, T, H, offs_s, cand, BLOCK_H), lse_s, w_s)
        score = score * rho
    else:
        score = a * rho
    if HAS_PREV:
        score = 0.5 * tl.load(prev + j * sp_n, mask=cand, other=0.0) + 0.5 * score
    tl.store(cum_ptr + first_cand + j, score, mask=cand)


@triton.jit
def _entropy(part_ptr, ent_ptr, b, N, n_chunks, BLOCK_C: tl.constexpr):
    """Hn of image b from its n_chunks chunks' entropy sums at part_ptr (n_chunks, 8), in chunk order, without
    cancellation: a p_m > ½ (one-hot rows put 1 − 1e-10 there, which rounds to 1) takes −ln p_m = −log1p(−r),
    r = Σ of the others (its exact complement); if rounding leaves two values above ½, their own logs."""
    ent_small = 0.0
    ent_big = 0.0
    rest = 0.0
    large = 0.0
    n_big = 0.0
    for c0 in range(0, n_chunks, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        at = part_ptr + offs * 8
        mask = offs < n_chunks
        ent_small += tl.sum(tl.load(at, mask=mask, other=0.0), axis=0)
        ent_big += tl.sum(tl.load(at + 1, mask=mask, other=0.0), axis=0)
        rest += tl.sum(tl.load(at + 2, mask=mask, other=0.0), axis=0)
        large += tl.sum(tl.load(at + 3, mask=mask, other=0.0), axis=0)
        n_big += tl.sum(tl.load(at + 4, mask=mask, other=0.0), axis=0)
    neg_plogp = ent_small + tl.where(n_big == 1.0, large * _neg_log1p_neg(tl.minimum(rest, 0.5)), ent_big)
    log_n = tl.log(tl.maximum(N, 2).to(tl.float32))
    tl.store(ent_ptr + b, tl.where(N > 1, neg_plogp / log_n, 0.0))  # Hn = 0 for a single candidate


@triton.jit
def _flow_scores_fused(
    q_ptr, k_ptr, v_ptr, cu_ptr, prev_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, part_ptr, cum_ptr, ent_ptr,
    attn_ptr,
    S, T, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, sp_b, sp_n,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per image: every chunk's phase 1, then phase 2 (a single launch)."""
    b = tl.program_id(0).to(tl.int64)
    start, length = segment(cu_ptr, b, S, VARLEN)
    for c in range(tl.cdiv(length, BLOCK_S)):
        _chunk_phase(
            q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, b, c, start, length, T, H, D, scale,
            sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
            HAS_CLS, SEMANTIC, VARLEN, BLOCK_S, BLOCK_D,
        )
    tl.debug_barrier()  # the scratch written above is read by other threads below
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    n_chunks = tl.cdiv(length, BLOCK_S)
    slot0 = start // BLOCK_S + b  # the image's first chunk slot
    logits, sems = logit_ptr + start, sem_ptr + start
    lse_a, lse_all, w_a, lse_s, w_s = _image_weights(
        logits, sems, stat_ptr + slot0 * H * 4, T, H, n_chunks, HAS_CLS, SEMANTIC, BLOCK_H, BLOCK_C,
    )
    first_cand = start - b * FIRST
    prev = prev_ptr + b * sp_b + (first_cand if VARLEN else 0) * sp_n
    for c in range(n_chunks):
        _finish_chunk(
            logits, sems, rho_ptr, prev, cum_ptr, attn_ptr, part_ptr + (slot0 + c) * 8, first_cand, start,
            c * BLOCK_S, length, T, H, sp_n, lse_a, lse_all, w_a, lse_s, w_s,
            HAS_CLS, SEMANTIC, HAS_PREV, BLOCK_S, BLOCK_H,
        )
    tl.debug_barrier()  # the entropy sums written above are read by other threads below
    _entropy(part_ptr + slot0 * 8, ent_ptr, b, length - FIRST, n_chunks, BLOCK_C)


@triton.jit
def _slot_owner(cu_ptr, B, slot, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """(image, chunk) of chunk slot ``slot`` (int64) of a packed batch of B ≤ BLOCK_B images. Image b's chunks
    take the slots from cu[b] // BLOCK_S + b on: disjoint, all below T // BLOCK_S + B; the chunk found may lie
    past its image's end (at most two per image)."""
    offs = tl.arange(0, BLOCK_B)
    first_slot = tl.load(cu_ptr + offs, mask=offs < B, other=0).to(tl.int64) // BLOCK_S + offs
    owned = (offs < B) & (first_slot <= slot)  # increasing first slots: images 0 … b
    return tl.sum(owned.to(tl.int64), axis=0) - 1, slot - tl.max(tl.where(owned, first_slot, 0), axis=0)


@triton.jit
def _program_chunk(cu_ptr, B, S, VARLEN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """The (image, chunk) of this program of a split launch — grid (B, chunks) for a dense batch, (chunk slots,)
    for a packed one — and the image's first packed row and length; the chunk may lie past the image's end."""
    if VARLEN:
        b, c = _slot_owner(cu_ptr, B, tl.program_id(0).to(tl.int64), BLOCK_S, BLOCK_B)
    else:
        b, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    start, length = segment(cu_ptr, b, S, VARLEN)
    return b, c, start, length


@triton.jit
def _flow_scores_split(
    q_ptr, k_ptr, v_ptr, cu_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr,
    B, S, T, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Phase 1 with one program per (image, chunk), for long images: grid (B, chunks) for a dense batch,
    (chunk slots,) for a packed one."""
    b, c, start, length = _program_chunk(cu_ptr, B, S, VARLEN, BLOCK_S, BLOCK_B)
    if c * BLOCK_S < length:
        _chunk_phase(
            q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, b, c, start, length, T, H, D, scale,
            sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
            HAS_CLS, SEMANTIC, VARLEN, BLOCK_S, BLOCK_D,
        )


@triton.jit
def _flow_scores_heads(
    cu_ptr, logit_ptr, sem_ptr, stat_ptr, head_ptr, S, T, H,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, VARLEN: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program b, after :func:`_flow_scores_split`: image b's per-head statistics (:func:`_image_weights`, merged
    from its chunk stats: O(chunks · H) work) to head_ptr (B, 5, BLOCK_H)."""
    b = tl.program_id(0).to(tl.int64)
    start, length = segment(cu_ptr, b, S, VARLEN)
    stats = stat_ptr + (start // BLOCK_S + b) * H * 4
    lse_a, lse_all, w_a, lse_s, w_s = _image_weights(
        logit_ptr + start, sem_ptr + start, stats, T, H, tl.cdiv(length, BLOCK_S), HAS_CLS, SEMANTIC, BLOCK_H,
        BLOCK_C,
    )
    heads = head_ptr + b * 5 * BLOCK_H + tl.arange(0, BLOCK_H)
    tl.store(heads, lse_a)
    tl.store(heads + BLOCK_H, lse_all)
    tl.store(heads + 2 * BLOCK_H, w_a)
    tl.store(heads + 3 * BLOCK_H, lse_s)
    tl.store(heads + 4 * BLOCK_H, w_s)


@triton.jit
def _flow_scores_finish(
    cu_ptr, logit_ptr, sem_ptr, rho_ptr, head_ptr, part_ptr, prev_ptr, cum_ptr, attn_ptr,
    B, S, T, H, sp_b, sp_n,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Phase 2 with one program per (image, chunk), the grid of :func:`_flow_scores_split`: no program streams a
    whole image."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    b, c, start, length = _program_chunk(cu_ptr, B, S, VARLEN, BLOCK_S, BLOCK_B)
    if c * BLOCK_S < length:
        offs_h = tl.arange(0, BLOCK_H)
        heads = head_ptr + b * 5 * BLOCK_H + offs_h
        first_cand = start - b * FIRST
        _finish_chunk(
            logit_ptr + start, sem_ptr + start, rho_ptr, prev_ptr + b * sp_b + (first_cand if VARLEN else 0) * sp_n,
            cum_ptr, attn_ptr, part_ptr + (start // BLOCK_S + b + c) * 8, first_cand, start, c * BLOCK_S, length,
            T, H, sp_n, tl.load(heads), tl.load(heads + BLOCK_H), tl.load(heads + 2 * BLOCK_H),
            tl.load(heads + 3 * BLOCK_H), tl.load(heads + 4 * BLOCK_H),
            HAS_CLS, SEMANTIC, HAS_PREV, BLOCK_S, BLOCK_H,
        )


@triton.jit
def _flow_scores_entropy(
    cu_ptr, part_ptr, ent_ptr, S, HAS_CLS: tl.constexpr, VARLEN: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program b, after :func:`_flow_scores_finish`: image b's Hn from its chunks' entropy sums."""
    b = tl.program_id(0).to(tl.int64)
    start, length = segment(cu_ptr, b, S, VARLEN)
    _entropy(part_ptr + (start // BLOCK_S + b) * 8, ent_ptr, b, length - (1 if HAS_CLS else 0),
             tl.cdiv(length, BLOCK_S), BLOCK_C)


BLOCK_S = 64
BLOCK_C = 64  # chunk statistics merged per step of phase 2
# Long images at small batch split phase 1 over (image, chunk) programs: one program per image
# would stream a whole 16k-token image through a single SM.
SPLIT_MIN_TOKENS = 2048
SPLIT_MAX_BATCH = 64


def flow_scores_into(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Tensor | None, scale: float, has_cls: bool, semantic: bool,
    cum: Tensor, entropy: Tensor, attn: Tensor, *, cu_seqlens: Tensor | None = None, split: bool | None = None,
    wrap=lambda kernel: kernel,
) -> None:
    """Write one layer's scores into cum, entropy (B,) and attn, float32 contiguous.

    Dense batch: k, v (B, H, S, D), prev, cum and attn (B, N). Packed batch (``cu_seqlens`` (B + 1,) int32 or
    int64 given): k, v (T, H, D), prev, cum and attn (T_c,), each image's candidates after the last's.
    q_relay (B, H, D), k and v (float16/bfloat16/float32) and prev (float32 or None) may have any strides.
    ``split`` forces (True) or forbids (False) the two-launch path for long images; None chooses by the
    longest image (an upper bound for a packed batch). ``wrap`` is applied to each kernel before launch
    (``wrap_triton`` when traced as a ``triton_op``).
    """
    batch, heads, dim = q_relay.shape
    packed = cu_seqlens is not None
    semantic = semantic and has_cls
    if packed:  # one (H, T, D) slab shared by the images (batch stride 0)
        rows = k.shape[0]
        longest = rows - (batch - 1) * (1 + has_cls)
        slabs = [(0, x.stride(1), x.stride(0), x.stride(2)) for x in (k, v)]
        sp = (0, prev.stride(0)) if prev is not None else (0, 0)
    else:
        longest = k.shape[2]
        rows = batch * longest
        slabs = [k.stride(), v.stride()]
        sp = prev.stride() if prev is not None else (0, 0)
    if split is None:
        split = longest >= SPLIT_MIN_TOKENS and batch <= SPLIT_MAX_BATCH
    f32 = dict(dtype=torch.float32, device=k.device)
    logits = torch.empty((heads, rows), **f32)
    sem = torch.empty((heads, rows), **f32) if semantic else logits
    rho = torch.empty((rows,), **f32)
    slots = rows // BLOCK_S + batch  # chunk slots (see _slot_owner)
    stats = torch.empty((slots, heads, 4), **f32)
    parts = torch.empty((slots, 8), **f32)  # each chunk's entropy sums
    cu_arg = cu_seqlens if packed else cum  # not read for a dense batch
    prev_arg = prev if prev is not None else cum
    strides = (*q_relay.stride(), *slabs[0], *slabs[1])
    blocks = dict(BLOCK_S=BLOCK_S, BLOCK_H=triton.next_power_of_2(heads))
    block_d = triton.next_power_of_2(dim)
    flags = dict(HAS_CLS=has_cls, SEMANTIC=semantic, HAS_PREV=prev is not None, VARLEN=packed)
    if split:
        grid = (slots,) if packed else (batch, triton.cdiv(longest, BLOCK_S))
        block_b = triton.next_power_of_2(batch)
        wrap(_flow_scores_split)[grid](
            q_relay, k, v, cu_arg, logits, sem, rho, stats, batch, longest, rows, heads, dim, scale, *strides,
            HAS_CLS=has_cls, SEMANTIC=semantic, VARLEN=packed, BLOCK_S=BLOCK_S, BLOCK_D=block_d, BLOCK_B=block_b,
        )
        head_stats = torch.empty((batch, 5, blocks["BLOCK_H"]), **f32)
        wrap(_flow_scores_heads)[(batch,)](
            cu_arg, logits, sem, stats, head_stats, longest, rows, heads,
            HAS_CLS=has_cls, SEMANTIC=semantic, VARLEN=packed, **blocks, BLOCK_C=BLOCK_C,
        )
        wrap(_flow_scores_finish)[grid](
            cu_arg, logits, sem, rho, head_stats, parts, prev_arg, cum, attn, batch, longest, rows, heads, *sp,
            **flags, **blocks, BLOCK_B=block_b,
        )
        wrap(_flow_scores_entropy)[(batch,)](
            cu_arg, parts, entropy, longest, HAS_CLS=has_cls, VARLEN=packed, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C,
        )
    else:
        wrap(_flow_scores_fused)[(batch,)](
            q_relay, k, v, cu_arg, prev_arg, logits, sem, rho, stats, parts, cum, entropy, attn,
            longest, rows, heads, dim, scale, *strides, *sp,
            **flags, **blocks, BLOCK_D=block_d, BLOCK_C=BLOCK_C,
        )


def flow_scores_outputs(k: Tensor, has_cls: bool, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised float32 (cum, entropy (B,), attn) for :func:`flow_scores_into`: cum and attn (B, N) for
    a dense batch, (T_c,) for a packed one (``cu_seqlens`` given)."""
    if cu_seqlens is None:
        batch, _, seq, _ = k.shape
        shape = (batch, seq - 1 if has_cls else seq)
    else:
        batch = cu_seqlens.numel() - 1
        shape = (k.shape[0] - batch * int(has_cls),)
    f32 = dict(dtype=torch.float32, device=k.device)
    return torch.empty(shape, **f32), torch.empty((batch,), **f32), torch.empty(shape, **f32)

"""Triton flow_scores: one layer's FlowCut scores (SPEC.md signals 1–7) in one kernel launch.

Per image the kernel reads q_relay, k and v once, chunk by chunk of ``BLOCK_S`` tokens:
  phase 1 (per chunk, every head): relay logits l_h[j] = scale·r_h·k_h[j], semantic logits
          v_h[0]·v_h[j] (CLS variant), ρ[j] = Σ_d |mean_h v_h[j, d]|, and each head's chunk
          max and Σexp — written to small float32 scratch rows;
  phase 2 (per image): the chunk statistics merged into each head's softmax max and sum, then
          A = mean_h softmax(l_h), Sm, their sums, the layer score, the cumulative update with
          ``prev`` and the normalised entropy Hn.
For short sequences (CLIP's 577 tokens) one program per image runs both phases: one launch.
For long sequences (≥ 2048 tokens) at small batch, phase 1 is split over (image, chunk) programs
and phase 2 is one small second launch that reads only the scratch (2·H + 1 floats per token).
Everything accumulates in float32.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _chunk_phase(
    q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr,
    b, c, S, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    n_chunks,
    SEMANTIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Phase 1 for tokens [c·BLOCK_S, (c+1)·BLOCK_S) of image b: logits, ρ and per-head chunk stats."""
    offs_s = c * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < S
    mask_sd = mask_s[:, None] & (offs_d[None, :] < D)
    v_sum = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for h in range(H):
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d * sq_d, mask=offs_d < D, other=0.0).to(tl.float32)
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d, mask=mask_sd, other=0.0
        ).to(tl.float32)
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + offs_s[:, None] * sv_s + offs_d[None, :] * sv_d, mask=mask_sd, other=0.0
        ).to(tl.float32)
        v_sum += v
        row = (b * H + h) * S + offs_s
        stat = ((b * n_chunks + c) * H + h) * 4
        logit = tl.where(mask_s, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        tl.store(logit_ptr + row, logit, mask=mask_s)
        m = tl.max(logit, axis=0)
        tl.store(stat_ptr + stat, m)
        tl.store(stat_ptr + stat + 1, tl.sum(tl.exp(logit - m), axis=0))
        if SEMANTIC:
            v0 = tl.load(v_ptr + b * sv_b + h * sv_h + offs_d * sv_d, mask=offs_d < D, other=0.0).to(tl.float32)
            sem = tl.where(mask_s, tl.sum(v * v0[None, :], axis=1), float("-inf"))
            tl.store(sem_ptr + row, sem, mask=mask_s)
            m = tl.max(sem, axis=0)
            tl.store(stat_ptr + stat + 2, m)
            tl.store(stat_ptr + stat + 3, tl.sum(tl.exp(sem - m), axis=0))
    rho = tl.sum(tl.abs(v_sum / H), axis=1)
    tl.store(rho_ptr + b * S + offs_s, rho, mask=mask_s)


@triton.jit
def _head_softmax_stats(stat_ptr, b, H, n_chunks, col, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge chunk (max, Σexp) pairs at stat columns (col, col+1) into each head's softmax max and sum."""
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < n_chunks) & mask_h[None, :]
        at = ((b * n_chunks + offs_c[:, None]) * H + offs_h[None, :]) * 4 + col
        cm = tl.load(stat_ptr + at, mask=mask, other=float("-inf"))
        cz = tl.load(stat_ptr + at + 1, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(cm, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - m_safe) + tl.sum(cz * tl.exp(cm - m_safe[None, :]), axis=0)
        m = m_new
    return tl.where(mask_h, m, 0.0), tl.where(mask_h, z, 1.0)


@triton.jit
def _head_mean_softmax(ptr, b, S, H, offs_s, mask_s, m, z, BLOCK_H: tl.constexpr):
    """mean over heads of softmax(row_h)[offs_s], given each head's max m and sum z: (BLOCK_S,)."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < H) & mask_s[None, :]
    x = tl.load(ptr + (b * H + offs_h[:, None]) * S + offs_s[None, :], mask=mask, other=float("-inf"))
    p = tl.exp(x - m[:, None]) / z[:, None]
    return tl.sum(tl.where(mask, p, 0.0), axis=0) / H


@triton.jit
def _finish_phase(
    logit_ptr, sem_ptr, rho_ptr, stat_ptr, prev_ptr, cum_ptr, ent_ptr, attn_ptr,
    b, S, H, n_chunks, sp_b, sp_n,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Phase 2 for image b: A, Sm, their candidate sums, the layer score, S_cum and Hn."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    N = S - FIRST
    m_a, z_a = _head_softmax_stats(stat_ptr, b, H, n_chunks, 0, BLOCK_H, BLOCK_C)
    m_s, z_s = m_a, z_a
    if SEMANTIC:
        m_s, z_s = _head_softmax_stats(stat_ptr, b, H, n_chunks, 2, BLOCK_H, BLOCK_C)
    # A over the candidates (written out) and the sums that normalise the layer score.
    sum_a = 0.0
    sum_sm = 0.0
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        cand = (offs_s >= FIRST) & (offs_s < S)
        a = _head_mean_softmax(logit_ptr, b, S, H, offs_s, cand, m_a, z_a, BLOCK_H)
        tl.store(attn_ptr + b * N + offs_s - FIRST, a, mask=cand)
        sum_a += tl.sum(tl.where(cand, a, 0.0), axis=0)
        if SEMANTIC:
            sm = _head_mean_softmax(sem_ptr, b, S, H, offs_s, cand, m_s, z_s, BLOCK_H)
            sum_sm += tl.sum(tl.where(cand, sm, 0.0), axis=0)
    tl.debug_barrier()  # A written by other threads of this program is read back below
    neg_plogp = 0.0
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        cand = (offs_s >= FIRST) & (offs_s < S)
        j = offs_s - FIRST
        a = tl.load(attn_ptr + b * N + j, mask=cand, other=0.0)
        rho = tl.load(rho_ptr + b * S + offs_s, mask=cand, other=0.0)
        p = a / sum_a
        neg_plogp -= tl.sum(p * tl.log(tl.where(p > 0.0, p, 1.0)), axis=0)  # 0·ln 0 = 0
        if HAS_CLS:
            score = p
            if SEMANTIC:
                sm = _head_mean_softmax(sem_ptr, b, S, H, offs_s, cand, m_s, z_s, BLOCK_H)
                score += sm / sum_sm
            score = score * rho
        else:
            score = a * rho
        if HAS_PREV:
            prev = tl.load(prev_ptr + b * sp_b + j * sp_n, mask=cand, other=0.0)
            score = 0.5 * prev + 0.5 * score
        tl.store(cum_ptr + b * N + j, score, mask=cand)
    log_n = tl.log(tl.maximum(N, 2).to(tl.float32))
    tl.store(ent_ptr + b, tl.where(N > 1, neg_plogp / log_n, 0.0))  # Hn = 0 for a single candidate


@triton.jit
def _flow_scores_fused(
    q_ptr, k_ptr, v_ptr, prev_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, cum_ptr, ent_ptr, attn_ptr,
    S, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, sp_b, sp_n,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per image: every chunk's phase 1, then phase 2 (a single launch)."""
    b = tl.program_id(0)
    n_chunks = tl.cdiv(S, BLOCK_S)
    for c in range(n_chunks):
        _chunk_phase(
            q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, b, c, S, H, D, scale,
            sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, n_chunks,
            SEMANTIC, BLOCK_S, BLOCK_D,
        )
    tl.debug_barrier()  # the scratch written above is read by other threads below
    _finish_phase(
        logit_ptr, sem_ptr, rho_ptr, stat_ptr, prev_ptr, cum_ptr, ent_ptr, attn_ptr,
        b, S, H, n_chunks, sp_b, sp_n, HAS_CLS, SEMANTIC, HAS_PREV, BLOCK_S, BLOCK_H, BLOCK_C,
    )


@triton.jit
def _flow_scores_split(
    q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr,
    S, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    SEMANTIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Phase 1 with one program per (image, chunk), for long sequences."""
    _chunk_phase(
        q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, tl.program_id(0), tl.program_id(1),
        S, H, D, scale, sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, tl.num_programs(1),
        SEMANTIC, BLOCK_S, BLOCK_D,
    )


@triton.jit
def _flow_scores_finish(
    logit_ptr, sem_ptr, rho_ptr, stat_ptr, prev_ptr, cum_ptr, ent_ptr, attn_ptr,
    S, H, n_chunks, sp_b, sp_n,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Phase 2 with one program per image, after :func:`_flow_scores_split`."""
    _finish_phase(
        logit_ptr, sem_ptr, rho_ptr, stat_ptr, prev_ptr, cum_ptr, ent_ptr, attn_ptr,
        tl.program_id(0), S, H, n_chunks, sp_b, sp_n,
        HAS_CLS, SEMANTIC, HAS_PREV, BLOCK_S, BLOCK_H, BLOCK_C,
    )


BLOCK_S = 64
# Long sequences at small batch split phase 1 over (image, chunk) programs: one program per image
# would stream a whole 16k-token image through a single SM.
SPLIT_MIN_TOKENS = 2048
SPLIT_MAX_BATCH = 64


def flow_scores_into(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Tensor | None, scale: float, has_cls: bool, semantic: bool,
    cum: Tensor, entropy: Tensor, attn: Tensor, *, split: bool | None = None, wrap=lambda kernel: kernel,
) -> None:
    """Write one layer's scores into cum (B, N), entropy (B,) and attn (B, N), float32 contiguous.

    q_relay (B, H, D), k/v (B, H, S, D) and prev (B, N) or None may have any strides and float
    dtypes. ``split`` forces (True) or forbids (False) the two-launch path for long sequences;
    None chooses by size. ``wrap`` is applied to each kernel before launch (``wrap_triton``
    when traced as a ``triton_op``).
    """
    batch, heads, seq, dim = k.shape
    semantic = semantic and has_cls
    n_chunks = triton.cdiv(seq, BLOCK_S)
    if split is None:
        split = seq >= SPLIT_MIN_TOKENS and batch <= SPLIT_MAX_BATCH
    f32 = dict(dtype=torch.float32, device=k.device)
    logits = torch.empty((batch, heads, seq), **f32)
    sem = torch.empty((batch, heads, seq), **f32) if semantic else logits
    rho = torch.empty((batch, seq), **f32)
    stats = torch.empty((batch, n_chunks, heads, 4), **f32)
    prev_arg = prev if prev is not None else cum
    sp = prev.stride() if prev is not None else (0, 0)
    strides = (*q_relay.stride(), *k.stride(), *v.stride())
    blocks = dict(BLOCK_S=BLOCK_S, BLOCK_H=triton.next_power_of_2(heads))
    block_d = triton.next_power_of_2(dim)
    flags = dict(HAS_CLS=has_cls, SEMANTIC=semantic, HAS_PREV=prev is not None)
    if split:
        wrap(_flow_scores_split)[(batch, n_chunks)](
            q_relay, k, v, logits, sem, rho, stats, seq, heads, dim, scale, *strides,
            SEMANTIC=semantic, BLOCK_S=BLOCK_S, BLOCK_D=block_d,
        )
        wrap(_flow_scores_finish)[(batch,)](
            logits, sem, rho, stats, prev_arg, cum, entropy, attn, seq, heads, n_chunks, *sp,
            **flags, **blocks, BLOCK_C=64,
        )
    else:
        wrap(_flow_scores_fused)[(batch,)](
            q_relay, k, v, prev_arg, logits, sem, rho, stats, cum, entropy, attn,
            seq, heads, dim, scale, *strides, *sp,
            **flags, **blocks, BLOCK_D=block_d, BLOCK_C=64,
        )


def flow_scores_outputs(k: Tensor, has_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (cum (B, N), entropy (B,), attn (B, N)) float32 for :func:`flow_scores_into`."""
    batch, _, seq, _ = k.shape
    n = seq - 1 if has_cls else seq
    f32 = dict(dtype=torch.float32, device=k.device)
    return torch.empty((batch, n), **f32), torch.empty((batch,), **f32), torch.empty((batch, n), **f32)

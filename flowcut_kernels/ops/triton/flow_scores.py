"""Triton flow_scores: one layer's FlowCut scores (SPEC.md signals 1–7) in one kernel launch.

Per image the kernel reads q_relay, k and v once, chunk by chunk of ``BLOCK_S`` tokens:
  phase 1 (per chunk, every head): relay logits l_h[j] = scale·r_h·k_h[j], semantic logits
          v_h[0]·v_h[j] (CLS variant), ρ[j] = Σ_d |mean_h v_h[j, d]|, written to float32 scratch rows
          (B, H, S) and (B, S), and each head's max and Σexp over the chunk's *candidates* (the relay
          logit l_h[0] is not in them; it stays in the scratch row);
  phase 2 (per image): per head, the chunk statistics merged (online softmax) into lse_cand_h, the
          log-sum-exp over the candidates, and lse_all_h = logaddexp(lse_cand_h, l_h[0]) in the CLS
          variant (= lse_cand_h in the mean variant); with d_h = lse_cand_h − lse_all_h and
          w_h = exp(d_h − max_h d_h), the normalised attention is
              p[j] = Σ_h w_h·exp(l_h[j] − lse_cand_h) / Σ_h w_h      (= A[j] / Σ_j A, never 0/0)
          and A[j] = mean_h exp(l_h[j] − lse_all_h) (it may underflow to 0 when the relay takes
          almost all the mass: its true float32 value); the semantic term p_sem likewise. Then the
          layer score ((p + p_sem)·ρ in the CLS variant, A·ρ in the mean variant), the cumulative
          update with ``prev`` and the normalised entropy Hn of p.
For short sequences (CLIP's 577 tokens) one program per image runs both phases: one launch.
For long sequences (≥ 2048 tokens) at small batch, phase 1 is split over (image, chunk) programs
and phase 2 is one small second launch that reads only the scratch (2·H + 1 floats per token).
Everything accumulates in float32; every address is computed in int64 (inputs may span > 2^31 elements).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _candidate_stats(ptr, x):
    """Store max(x) and Σ exp(x − max) at ptr[0], ptr[1]; x (BLOCK_S,) is −inf off the candidates."""
    m = tl.max(x, axis=0)
    tl.store(ptr, m)
    tl.store(ptr + 1, tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)), axis=0))


@triton.jit
def _chunk_phase(
    q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr,
    b, c, S, H, D, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    n_chunks,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Phase 1 for tokens [c·BLOCK_S, (c+1)·BLOCK_S) of image b (an int64 id): logits, ρ and candidate stats.

    Stats (B, n_chunks, H, 4): per head, the chunk candidates' max and Σexp(l − max) of the relay logits,
    then of the semantic logits.
    """
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    chunk = tl.cast(c, tl.int64)
    offs_s = chunk * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask_s = offs_s < S
    cand = mask_s & (offs_s >= FIRST)
    mask_sd = mask_s[:, None] & (offs_d[None, :] < D)
    v_sum = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for head in range(H):
        h = tl.cast(head, tl.int64)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d * sq_d, mask=offs_d < D, other=0.0).to(tl.float32)
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d, mask=mask_sd, other=0.0
        ).to(tl.float32)
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + offs_s[:, None] * sv_s + offs_d[None, :] * sv_d, mask=mask_sd, other=0.0
        ).to(tl.float32)
        v_sum += v
        row = (b * H + h) * S + offs_s
        stat = ((b * n_chunks + chunk) * H + h) * 4
        logit = tl.sum(k * q[None, :], axis=1) * scale
        tl.store(logit_ptr + row, logit, mask=mask_s)
        _candidate_stats(stat_ptr + stat, tl.where(cand, logit, float("-inf")))
        if SEMANTIC:
            v0 = tl.load(v_ptr + b * sv_b + h * sv_h + offs_d * sv_d, mask=offs_d < D, other=0.0).to(tl.float32)
            sem = tl.sum(v * v0[None, :], axis=1)
            tl.store(sem_ptr + row, sem, mask=mask_s)
            _candidate_stats(stat_ptr + stat + 2, tl.where(cand, sem, float("-inf")))
    rho = tl.sum(tl.abs(v_sum / H), axis=1)
    tl.store(rho_ptr + b * S + offs_s, rho, mask=mask_s)


@triton.jit
def _candidate_lse(stat_ptr, b, H, n_chunks, col, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each head's log-sum-exp over the candidates, merged from the chunks' (max, Σexp) pairs at stat
    columns (col, col + 1): (BLOCK_H,), 0 past H."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < H
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (offs_c[:, None] < n_chunks) & mask_h[None, :]
        at = ((b * n_chunks + offs_c[:, None]) * H + offs_h[None, :]) * 4 + col
        cm = tl.load(stat_ptr + at, mask=mask, other=float("-inf"))
        cz = tl.load(stat_ptr + at + 1, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(cm, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - m_safe) + tl.sum(cz * tl.exp(cm - m_safe[None, :]), axis=0)  # rescaled to m_new
        m = m_new
    return tl.where(mask_h, m, 0.0) + tl.log(tl.where(mask_h, z, 1.0))


@triton.jit
def _head_weights(
    row_ptr, stat_ptr, b, S, H, n_chunks, col,
    HAS_CLS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per head (BLOCK_H,): lse_cand_h, lse_all_h and w_h / Σ_h w_h (0 past H) for logit rows (B, H, S)."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < H
    lse_cand = _candidate_lse(stat_ptr, b, H, n_chunks, col, BLOCK_H, BLOCK_C)
    lse_all = lse_cand
    if HAS_CLS:  # logaddexp with the relay logit l_h[0]
        relay = tl.load(row_ptr + (b * H + offs_h) * S, mask=mask_h, other=0.0)
        hi = tl.maximum(lse_cand, relay)
        lse_all = hi + tl.log(tl.exp(lse_cand - hi) + tl.exp(relay - hi))
    d = tl.where(mask_h, lse_cand - lse_all, float("-inf"))
    w = tl.exp(d - tl.max(d, axis=0))
    return lse_cand, lse_all, w / tl.sum(w, axis=0)


@triton.jit
def _logit_tile(row_ptr, b, S, H, offs_s, cand, BLOCK_H: tl.constexpr):
    """Logit rows (B, H, S) of image b at tokens offs_s: (BLOCK_H, BLOCK_S), −inf past H and off the candidates."""
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask = (offs_h[:, None] < H) & cand[None, :]
    return tl.load(row_ptr + (b * H + offs_h[:, None]) * S + offs_s[None, :], mask=mask, other=float("-inf"))


@triton.jit
def _mix(x, lse, w):
    """Σ_h w_h·exp(x_h − lse_h) of a logit tile x (BLOCK_H, BLOCK_S): (BLOCK_S,)."""
    return tl.sum(w[:, None] * tl.exp(x - lse[:, None]), axis=0)


@triton.jit
def _finish_phase(
    logit_ptr, sem_ptr, rho_ptr, stat_ptr, prev_ptr, cum_ptr, ent_ptr, attn_ptr,
    b, S, H, n_chunks, sp_b, sp_n,
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, HAS_PREV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Phase 2 for image b (an int64 id): p, A, p_sem, the layer score, S_cum and Hn, in one pass over the tokens."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    N = S - FIRST
    lse_a, lse_all, w_a = _head_weights(logit_ptr, stat_ptr, b, S, H, n_chunks, 0, HAS_CLS, BLOCK_H, BLOCK_C)
    if SEMANTIC:
        lse_s, _, w_s = _head_weights(sem_ptr, stat_ptr, b, S, H, n_chunks, 2, HAS_CLS, BLOCK_H, BLOCK_C)
    uniform = tl.where(tl.arange(0, BLOCK_H) < H, 1.0 / H, 0.0)
    neg_plogp = 0.0
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        cand = (offs_s >= FIRST) & (offs_s < S)
        j = offs_s - FIRST
        x = _logit_tile(logit_ptr, b, S, H, offs_s, cand, BLOCK_H)
        p = _mix(x, lse_a, w_a)
        if HAS_CLS:
            a = _mix(x, lse_all, uniform)
        else:
            a = p  # lse_all = lse_cand and w_h = 1/H: the same sum
        tl.store(attn_ptr + b * N + j, a, mask=cand)
        neg_plogp -= tl.sum(p * tl.log(tl.where(p > 0.0, p, 1.0)), axis=0)  # 0·ln 0 = 0
        rho = tl.load(rho_ptr + b * S + offs_s, mask=cand, other=0.0)
        if HAS_CLS:
            score = p
            if SEMANTIC:
                score += _mix(_logit_tile(sem_ptr, b, S, H, offs_s, cand, BLOCK_H), lse_s, w_s)
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
    b = tl.program_id(0).to(tl.int64)
    n_chunks = tl.cdiv(S, BLOCK_S)
    for c in range(n_chunks):
        _chunk_phase(
            q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr, b, c, S, H, D, scale,
            sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, n_chunks,
            HAS_CLS, SEMANTIC, BLOCK_S, BLOCK_D,
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
    HAS_CLS: tl.constexpr, SEMANTIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Phase 1 with one program per (image, chunk), for long sequences."""
    _chunk_phase(
        q_ptr, k_ptr, v_ptr, logit_ptr, sem_ptr, rho_ptr, stat_ptr,
        tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
        S, H, D, scale, sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, tl.num_programs(1),
        HAS_CLS, SEMANTIC, BLOCK_S, BLOCK_D,
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
        tl.program_id(0).to(tl.int64), S, H, n_chunks, sp_b, sp_n,
        HAS_CLS, SEMANTIC, HAS_PREV, BLOCK_S, BLOCK_H, BLOCK_C,
    )


BLOCK_S = 64
BLOCK_C = 64  # chunk statistics merged per step of phase 2
# Long sequences at small batch split phase 1 over (image, chunk) programs: one program per image
# would stream a whole 16k-token image through a single SM.
SPLIT_MIN_TOKENS = 2048
SPLIT_MAX_BATCH = 64


def flow_scores_into(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Tensor | None, scale: float, has_cls: bool, semantic: bool,
    cum: Tensor, entropy: Tensor, attn: Tensor, *, split: bool | None = None, wrap=lambda kernel: kernel,
) -> None:
    """Write one layer's scores into cum (B, N), entropy (B,) and attn (B, N), float32 contiguous.

    q_relay (B, H, D), k/v (B, H, S, D) (float16/bfloat16/float32) and prev (B, N) float32 or None
    may have any strides. ``split`` forces (True) or forbids (False) the two-launch path for long
    sequences; None chooses by size. ``wrap`` is applied to each kernel before launch
    (``wrap_triton`` when traced as a ``triton_op``).
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
            HAS_CLS=has_cls, SEMANTIC=semantic, BLOCK_S=BLOCK_S, BLOCK_D=block_d,
        )
        wrap(_flow_scores_finish)[(batch,)](
            logits, sem, rho, stats, prev_arg, cum, entropy, attn, seq, heads, n_chunks, *sp,
            **flags, **blocks, BLOCK_C=BLOCK_C,
        )
    else:
        wrap(_flow_scores_fused)[(batch,)](
            q_relay, k, v, prev_arg, logits, sem, rho, stats, cum, entropy, attn,
            seq, heads, dim, scale, *strides, *sp,
            **flags, **blocks, BLOCK_D=block_d, BLOCK_C=BLOCK_C,
        )


def flow_scores_outputs(k: Tensor, has_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (cum (B, N), entropy (B,), attn (B, N)) float32 for :func:`flow_scores_into`."""
    batch, _, seq, _ = k.shape
    n = seq - 1 if has_cls else seq
    f32 = dict(dtype=torch.float32, device=k.device)
    return torch.empty((batch, n), **f32), torch.empty((batch,), **f32), torch.empty((batch, n), **f32)

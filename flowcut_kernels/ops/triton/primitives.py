"""Triton kernels of the generic primitives (:mod:`flowcut_kernels.ops.primitives`): attention_scores,
text_guided_scores, topk_select, merge_nearest. What they compute: the "Generic primitives" section of
:mod:`flowcut_kernels.ops.reference`; schemas and fakes: :mod:`flowcut_kernels.ops.library`.

attention_scores — two launches, no atomics:
  1. grid (B·Hkv, row blocks): the query rows of the ``group = Hq / Hkv`` heads that read key head kh,
     stacked (group·Q rows, GQA without repeating k), against every key chunk of S: an online softmax per
     row (max and Σexp rescaled chunk by chunk, masked keys −inf) gives each row's log-sum-exp, written
     to a (B, Hq·Q) float32 scratch;
  2. grid (B, span blocks): per block of span columns, every key head's chunk is read once and each row's
     logits recomputed on it; exp(l − lse) summed over the rows and heads, divided by Hq·Q.
text_guided_scores — the same two steps per segment: grid (G, Hkv) for the log-sum-exps of the relevance
  rows (the group query heads of key head kh, over the segment's keys) and of the semantic row (v_relay of
  kh over the segment's values); then grid (G, chunks) for the scores, with ρ from the head-summed values
  of the chunk. The segments (b, start, end, output offset) go to the device as one small int64 table.
topk_select — grid (B,), one program per image: the scores (fp16/bf16 widened to fp32) map to
  order-preserving 32-bit keys (−0.0 = +0.0, every NaN one key above +inf; protected rows −1, out of the
  contest), a bitwise search finds the keep[b]-th largest key t, and a compaction writes the kept rows
  (protected, key > t, the lowest-indexed ties still needed) and the dropped rows at their running counts
  (ascending order). With ``protect`` the output sizes depend on the data: the total kept count
  (Σ keep + the protected rows) is read on the host once (one scalar, an unbacked size when traced); the
  per-image offsets are computed on the device. Without it nothing is read on the host.
merge_nearest — two launches, deterministic, no atomics:
  1. assign, grid (dropped blocks,): each dropped row finds its image (binary search in dropped_cu) and
     scans the kept rows of its image in tiles: dots of the keys over Ck chunks with both rows' norms
     accumulated alongside, cosine = dot / (max(|a|, 1e-12)·max(|b|, 1e-12)); the first maximum (a NaN
     similarity ranks first, as argmax) is its target position in ``kept`` (int64 scratch);
  2. accumulate, grid (K, channel blocks): each program owns one kept row, scans the targets of its
     image's dropped rows and adds s_j·h_j of each match in ascending dropped order, then divides.

Every address is computed in int64. Dots run in the input dtype (fp16/bf16, float32 accumulation) or, for
float32 / mixed dtypes / the CPU interpreter, in float32 with ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import os
from itertools import accumulate

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_HALF = (torch.float16, torch.bfloat16)


def _f32_dot(*tensors: Tensor) -> bool:
    """Whether the kernels' dots run in float32 (ieee): not for same-dtype fp16/bf16 inputs on a GPU."""
    dtypes = {t.dtype for t in tensors}
    return INTERPRET or len(dtypes) != 1 or dtypes.pop() not in _HALF


@triton.jit
def _dot_nt(a, b, F32: tl.constexpr):
    """a (M, K) · b (N, K)ᵀ → (M, N) float32."""
    if F32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b))


@triton.jit
def _online(m, z, x):
    """One step of an online softmax along axis 1 (x (M, N), −inf excluded): the new (max, Σexp) per row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, z


@triton.jit
def _key_valid(mask_ptr, b, offs_s, S, sm_b, sm_s, HAS_MASK: tl.constexpr):
    """Keys offs_s (int64) of image b that may be attended: in range and True in key_mask."""
    valid = offs_s < S
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b * sm_b + offs_s * sm_s, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _query_rows(q_ptr, b, kh, rows, n_rows, Q, D, sq_b, sq_h, sq_q, sq_d, GROUP, BLOCK_D: tl.constexpr):
    """The query rows ``rows`` (int64) of key head kh's group (row r: head kh·GROUP + r // Q, query r % Q):
    (BLOCK_M, BLOCK_D), zero past n_rows and D."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    head = kh * GROUP + rows // Q
    at = q_ptr + b * sq_b + head[:, None] * sq_h + (rows % Q)[:, None] * sq_q + offs_d[None, :] * sq_d
    return tl.load(at, mask=(rows < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _attn_lse_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr,
    S, Q, D, HKV, GROUP, scale,
    sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_s, sk_d, sm_b, sm_s,
    HAS_MASK: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b·Hkv + kh, row block): log-sum-exp over the S keys of each query row of kh's group."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // HKV
    kh = bh % HKV
    n_rows = GROUP * Q
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    q = _query_rows(q_ptr, b, kh, rows, n_rows, Q, D, sq_b, sq_h, sq_q, sq_d, GROUP, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    k_head = k_ptr + b * sk_b + kh * sk_h
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        k = tl.load(k_head + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d,
                    mask=(offs_s < S)[:, None] & (offs_d < D)[None, :], other=0.0)
        x = _dot_nt(q, k, F32) * scale
        valid = _key_valid(mask_ptr, b, offs_s, S, sm_b, sm_s, HAS_MASK)
        m, z = _online(m, z, tl.where(valid[None, :], x, float("-inf")))
    tl.store(lse_ptr + b * HKV * n_rows + kh * n_rows + rows, m + tl.log(z), mask=rows < n_rows)


@triton.jit
def _attn_mean_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, out_ptr,
    S, Q, D, HKV, GROUP, scale, span_start, span_end,
    sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_s, sk_d, sm_b, sm_s,
    HAS_MASK: tl.constexpr, F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b, span block): Σ over heads and rows of exp(l − lse) on BLOCK_S span columns, / (Hq·Q)."""
    b = tl.program_id(0).to(tl.int64)
    n_rows = GROUP * Q
    cols = span_start + tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    in_span = cols < span_end
    valid = _key_valid(mask_ptr, b, cols, span_end, sm_b, sm_s, HAS_MASK)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for head in range(HKV):
        kh = tl.cast(head, tl.int64)
        k = tl.load(k_ptr + b * sk_b + kh * sk_h + cols[:, None] * sk_s + offs_d[None, :] * sk_d,
                    mask=in_span[:, None] & (offs_d < D)[None, :], other=0.0)
        for m0 in range(0, n_rows, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            q = _query_rows(q_ptr, b, kh, rows, n_rows, Q, D, sq_b, sq_h, sq_q, sq_d, GROUP, BLOCK_D)
            lse = tl.load(lse_ptr + b * HKV * n_rows + kh * n_rows + rows, mask=rows < n_rows, other=float("inf"))
            p = tl.exp(_dot_nt(q, k, F32) * scale - lse[:, None])  # 0 on the rows past n_rows
            acc += tl.sum(tl.where(valid[None, :], p, 0.0), axis=0)
    tl.store(out_ptr + b * (span_end - span_start) + cols - span_start, acc / (HKV * n_rows), mask=in_span)


BLOCK_S = 64  # keys (columns) per tile
MAX_BLOCK_M = 64  # query rows per tile


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot takes dimensions >= 16


def attention_scores(
    q: Tensor, k: Tensor, scale: float, key_mask: Tensor | None, span_start: int, span_end: int,
    wrap=lambda kernel: kernel,
) -> Tensor:
    """(B, span_end − span_start) float32: mean over the Hq heads and Q rows of softmax over the S keys of
    scale·q·k (query head h reads key head h // (Hq / Hkv)), masked keys excluded; the span's columns.
    q (B, Hq, Q, D), k (B, Hkv, S, D) and key_mask (B, S) bool may have any strides."""
    batch, kv_heads, seq, dim = k.shape
    heads, rows = q.shape[1], q.shape[2]
    group = heads // kv_heads
    out = torch.empty((batch, span_end - span_start), dtype=torch.float32, device=k.device)
    if out.numel() == 0:
        return out
    lse = torch.empty((batch, heads * rows), dtype=torch.float32, device=k.device)
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(group * rows)))
    mask_arg, mask_strides = (key_mask, key_mask.stride()) if key_mask is not None else (k, (0, 0))
    strides = (*q.stride(), *k.stride(), *mask_strides)
    meta = {"HAS_MASK": key_mask is not None, "F32": _f32_dot(q, k), "BLOCK_M": block_m, "BLOCK_S": BLOCK_S,
            "BLOCK_D": _block_d(dim)}
    wrap(_attn_lse_kernel)[(batch * kv_heads, triton.cdiv(group * rows, block_m))](
        q, k, mask_arg, lse, seq, rows, dim, kv_heads, group, scale, *strides, **meta
    )
    wrap(_attn_mean_kernel)[(batch, triton.cdiv(span_end - span_start, BLOCK_S))](
        q, k, mask_arg, lse, out, seq, rows, dim, kv_heads, group, scale, span_start, span_end, *strides, **meta
    )
    return out


# --- text_guided_scores ----------------------------------------------------------------------------------


@triton.jit
def _segment(seg_ptr, g):
    """Segment g's (b, start, end, output offset), int64."""
    row = seg_ptr + g * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _relay_rows(q_ptr, b, kh, D, sq_b, sq_h, sq_d, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """q_relay of the GROUP query heads of key head kh: (BLOCK_M, BLOCK_D), zero past GROUP and D."""
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    at = q_ptr + b * sq_b + (kh * GROUP + rows)[:, None] * sq_h + offs_d[None, :] * sq_d
    return tl.load(at, mask=(rows < GROUP)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _kv_tile(ptr, b, kh, offs_s, end, D, s_b, s_h, s_s, s_d, BLOCK_D: tl.constexpr):
    """Rows offs_s (< end) of head kh of sequence b: (BLOCK_S, BLOCK_D), zero outside."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    at = ptr + b * s_b + kh * s_h + offs_s[:, None] * s_s + offs_d[None, :] * s_d
    return tl.load(at, mask=(offs_s < end)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _text_lse_kernel(
    q_ptr, vr_ptr, k_ptr, v_ptr, seg_ptr, lse_rel_ptr, lse_sem_ptr,
    D, HKV, GROUP, scale,
    sq_b, sq_h, sq_d, sr_b, sr_h, sr_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (segment g, key head kh): log-sum-exps over the segment of the GROUP relevance rows
    scale·q_h·k_kh[j] and of the semantic row scale·v_relay_kh·v_kh[j]."""
    g = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1).to(tl.int64)
    b, start, end, _ = _segment(seg_ptr, g)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = _relay_rows(q_ptr, b, kh, D, sq_b, sq_h, sq_d, GROUP, BLOCK_M, BLOCK_D)
    vr = tl.load(vr_ptr + b * sr_b + kh * sr_h + offs_d * sr_d, mask=offs_d < D, other=0.0).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_sem = tl.full((1,), float("-inf"), dtype=tl.float32)
    z_sem = tl.zeros((1,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        valid = offs_s < end
        k = _kv_tile(k_ptr, b, kh, offs_s, end, D, sk_b, sk_h, sk_s, sk_d, BLOCK_D)
        m, z = _online(m, z, tl.where(valid[None, :], _dot_nt(q, k, F32) * scale, float("-inf")))
        v = _kv_tile(v_ptr, b, kh, offs_s, end, D, sv_b, sv_h, sv_s, sv_d, BLOCK_D).to(tl.float32)
        sem = tl.sum(v * vr[None, :], axis=1) * scale
        m_sem, z_sem = _online(m_sem, z_sem, tl.where(valid, sem, float("-inf"))[None, :])
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    tl.store(lse_rel_ptr + g * HKV * GROUP + kh * GROUP + rows, m + tl.log(z), mask=rows < GROUP)
    tl.store(lse_sem_ptr + g * HKV + kh + tl.arange(0, 1), m_sem + tl.log(z_sem))


@triton.jit
def _text_score_kernel(
    q_ptr, vr_ptr, k_ptr, v_ptr, seg_ptr, lse_rel_ptr, lse_sem_ptr, out_ptr,
    D, HKV, GROUP, scale,
    sq_b, sq_h, sq_d, sr_b, sr_h, sr_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (segment g, chunk c): (rel + sem)·ρ of the segment's tokens c·BLOCK_S … (c+1)·BLOCK_S − 1."""
    g = tl.program_id(0).to(tl.int64)
    b, start, end, out0 = _segment(seg_ptr, g)
    offs_s = start + tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    valid = offs_s < end
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    rows = tl.arange(0, BLOCK_M).to(tl.int64)
    rel = tl.zeros((BLOCK_S,), dtype=tl.float32)
    sem = tl.zeros((BLOCK_S,), dtype=tl.float32)
    v_sum = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for head in range(HKV):
        kh = tl.cast(head, tl.int64)
        q = _relay_rows(q_ptr, b, kh, D, sq_b, sq_h, sq_d, GROUP, BLOCK_M, BLOCK_D)
        k = _kv_tile(k_ptr, b, kh, offs_s, end, D, sk_b, sk_h, sk_s, sk_d, BLOCK_D)
        lse = tl.load(lse_rel_ptr + g * HKV * GROUP + kh * GROUP + rows, mask=rows < GROUP, other=float("inf"))
        rel += tl.sum(tl.exp(_dot_nt(q, k, F32) * scale - lse[:, None]), axis=0)  # 0 on the rows past GROUP
        v = _kv_tile(v_ptr, b, kh, offs_s, end, D, sv_b, sv_h, sv_s, sv_d, BLOCK_D).to(tl.float32)
        vr = tl.load(vr_ptr + b * sr_b + kh * sr_h + offs_d * sr_d, mask=offs_d < D, other=0.0).to(tl.float32)
        sem += tl.exp(tl.sum(v * vr[None, :], axis=1) * scale - tl.load(lse_sem_ptr + g * HKV + kh))
        v_sum += v
    rho = tl.sum(tl.abs(v_sum / HKV), axis=1)  # the mean over the Hq heads is the mean over the Hkv heads
    score = (rel / (HKV * GROUP) + sem / HKV) * rho
    tl.store(out_ptr + out0 + offs_s - start, score, mask=valid)


def text_guided_scores(
    q_relay: Tensor, v_relay: Tensor, k: Tensor, v: Tensor, segments: list[int], scale: float,
    wrap=lambda kernel: kernel,
) -> Tensor:
    """(Σ (end − start),) float32, segment by segment: (rel + sem)·ρ (see the reference). q_relay (B, Hq, D),
    v_relay (B, Hkv, D), k and v (B, Hkv, S, D) may have any strides; segments flat (b, start, end)*."""
    _, kv_heads, _, dim = k.shape
    group = q_relay.shape[1] // kv_heads
    triples = list(zip(segments[0::3], segments[1::3], segments[2::3]))
    lengths = [end - start for _, start, end in triples]
    out = torch.empty((sum(lengths),), dtype=torch.float32, device=k.device)
    if out.numel() == 0:
        return out
    offsets = accumulate(lengths, initial=0)
    table = torch.tensor([[b, start, end, off] for (b, start, end), off in zip(triples, offsets)],
                         dtype=torch.int64, device=k.device)
    f32 = {"dtype": torch.float32, "device": k.device}
    lse_rel = torch.empty((len(triples), kv_heads * group), **f32)
    lse_sem = torch.empty((len(triples), kv_heads), **f32)
    args = (q_relay, v_relay, k, v, table, lse_rel, lse_sem)
    scalars = (dim, kv_heads, group, scale, *q_relay.stride(), *v_relay.stride(), *k.stride(), *v.stride())
    meta = {"F32": _f32_dot(q_relay, k), "BLOCK_M": max(16, triton.next_power_of_2(group)), "BLOCK_S": BLOCK_S,
            "BLOCK_D": _block_d(dim)}
    wrap(_text_lse_kernel)[(len(triples), kv_heads)](*args, *scalars, **meta)
    wrap(_text_score_kernel)[(len(triples), triton.cdiv(max(lengths), BLOCK_S))](*args, out, *scalars, **meta)
    return out


# --- topk_select -----------------------------------------------------------------------------------------


@triton.jit
def _row_keys(scores_ptr, prot_ptr, offs, end, ss, sp, HAS_PROTECT: tl.constexpr):
    """Rows offs (int64, < end): order-preserving keys in [0, 2^32) (int64) of the free rows, −1 for protected
    rows and past end; and which rows are protected."""
    in_range = offs < end
    x = tl.load(scores_ptr + offs * ss, mask=in_range, other=0.0).to(tl.float32)  # exact for fp16/bf16
    x = tl.where(x == 0.0, 0.0, x)  # −0.0 ties with +0.0
    bits = tl.where(x != x, 0x7FFFFFFF, x.to(tl.int32, bitcast=True))  # any NaN: the top key, 2^32 − 1
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
    protected = offs < 0  # none
    if HAS_PROTECT:
        protected = in_range & (tl.load(prot_ptr + offs * sp, mask=in_range, other=0) != 0)
    return tl.where(in_range & ~protected, key, -1), protected


@triton.jit
def _count_keys_at_least(scores_ptr, prot_ptr, start, end, ss, sp, t, HAS_PROTECT: tl.constexpr, BLOCK: tl.constexpr):
    """How many free rows of start … end − 1 have a key >= t."""
    count = 0
    for n0 in range(start, end, BLOCK):
        key, _ = _row_keys(scores_ptr, prot_ptr, n0 + tl.arange(0, BLOCK).to(tl.int64), end, ss, sp, HAS_PROTECT)
        count += tl.sum((key >= t).to(tl.int32), axis=0)
    return count


@triton.jit
def _topk_select_kernel(
    scores_ptr, prot_ptr, cu_ptr, keep_ptr, kept_cu_ptr, dropped_cu_ptr, kept_ptr, dropped_ptr,
    ss, sp,
    HAS_PROTECT: tl.constexpr, BLOCK_SEARCH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program b: image b's keep[b] best free rows plus its protected rows kept, the rest dropped, both written
    ascending from kept_cu[b] / dropped_cu[b]."""
    b = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    n_keep = tl.load(keep_ptr + b)
    kept0 = tl.load(kept_cu_ptr + b).to(tl.int64)
    dropped0 = tl.load(dropped_cu_ptr + b).to(tl.int64)
    # t: the largest key with at least n_keep free keys >= t (the n_keep-th largest free key).
    t = tl.zeros((), dtype=tl.int64)
    if end - start <= BLOCK_SEARCH:  # the image fits one block: load its keys once
        keys, _ = _row_keys(scores_ptr, prot_ptr, start + tl.arange(0, BLOCK_SEARCH).to(tl.int64), end, ss, sp,
                            HAS_PROTECT)
        for bit in tl.static_range(31, -1, -1):
            cand = t | (1 << bit)
            t = tl.where(tl.sum((keys >= cand).to(tl.int32), axis=0) >= n_keep, cand, t)
        ties_needed = n_keep - tl.sum((keys > t).to(tl.int32), axis=0)
    else:
        for bit in tl.static_range(31, -1, -1):
            cand = t | (1 << bit)
            count = _count_keys_at_least(scores_ptr, prot_ptr, start, end, ss, sp, cand, HAS_PROTECT, BLOCK_SEARCH)
            t = tl.where(count >= n_keep, cand, t)
        ties_needed = n_keep - _count_keys_at_least(scores_ptr, prot_ptr, start, end, ss, sp, t + 1, HAS_PROTECT,
                                                     BLOCK_SEARCH)
    ties_seen = 0
    kept_seen = 0
    dropped_seen = 0
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        key, protected = _row_keys(scores_ptr, prot_ptr, offs, end, ss, sp, HAS_PROTECT)
        tie = (key == t).to(tl.int32)  # t >= 0: never a protected row or one past end
        tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
        kept = protected | (key > t) | ((tie == 1) & (tie_rank < ties_needed))
        dropped = (offs < end) & ~kept
        kept_i = kept.to(tl.int32)
        dropped_i = dropped.to(tl.int32)
        tl.store(kept_ptr + kept0 + kept_seen + tl.cumsum(kept_i, axis=0) - kept_i, offs, mask=kept)
        tl.store(dropped_ptr + dropped0 + dropped_seen + tl.cumsum(dropped_i, axis=0) - dropped_i, offs, mask=dropped)
        ties_seen += tl.sum(tie, axis=0)
        kept_seen += tl.sum(kept_i, axis=0)
        dropped_seen += tl.sum(dropped_i, axis=0)


BLOCK_N = 256  # rows per compaction step
MAX_BLOCK_SEARCH = 1024  # keys per step of the threshold search (all of them for images up to 1024 rows)


def topk_select(
    scores: Tensor, cu_seqlens: Tensor, keep: list[int], protect: Tensor | None, wrap=lambda kernel: kernel,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per image the keep[b] best unprotected rows plus every protected row: kept and dropped int64 row indices
    (ascending within each image) and their (B + 1,) offsets in cu_seqlens' dtype. scores (T,) fp16/bf16/fp32
    and protect (T,) bool may be strided. With ``protect`` the kept count is read on the host (one scalar)."""
    batch = cu_seqlens.numel() - 1
    rows = scores.shape[0]
    if len(keep) != batch or any(n < 0 for n in keep):
        raise ValueError(f"keep must hold {batch} counts >= 0, got {keep}")
    device = cu_seqlens.device
    keep_t = torch.tensor(keep, dtype=torch.int64, device=device)
    total = sum(keep)
    counts = keep_t
    if protect is not None:
        # Protected rows per image on the device; their total sizes the outputs (one host read).
        ends = torch.nn.functional.pad(protect.cumsum(0), (1, 0))
        cu = cu_seqlens.long()
        counts = keep_t + ends[cu[1:]] - ends[cu[:-1]]
        total = (protect.sum() + total).item()  # the one host read (an unbacked size when traced)
        torch._check(total >= sum(keep))
        torch._check(total <= rows)
    kept_cu = torch.cat([keep_t.new_zeros(1), counts.cumsum(0)]).to(cu_seqlens.dtype)
    dropped_cu = cu_seqlens - kept_cu
    kept = torch.empty((total,), dtype=torch.int64, device=device)
    dropped = torch.empty((rows - total,), dtype=torch.int64, device=device)
    if batch > 0 and rows > 0:
        # rows bounds one image's length without reading cu_seqlens
        block_search = min(max(16, triton.next_power_of_2(rows)), MAX_BLOCK_SEARCH)
        wrap(_topk_select_kernel)[(batch,)](
            scores, protect if protect is not None else scores, cu_seqlens, keep_t, kept_cu, dropped_cu, kept,
            dropped, scores.stride(0), protect.stride(0) if protect is not None else 0,
            HAS_PROTECT=protect is not None, BLOCK_SEARCH=block_search, BLOCK_N=BLOCK_N,
        )
    return kept, dropped, kept_cu, dropped_cu


# --- merge_nearest ---------------------------------------------------------------------------------------


@triton.jit
def _image_of(cu_ptr, pos, B, STEPS):
    """The image b of position pos (int64, any shape) in a grouping with offsets cu (B + 1,): the largest b < B
    with cu[b] <= pos (binary search, STEPS = bit length of B − 1 steps)."""
    lo = tl.zeros_like(pos)
    hi = lo + B
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        go = tl.load(cu_ptr + mid).to(tl.int64) <= pos
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _merge_assign_kernel(
    keys_ptr, kept_ptr, dropped_ptr, kept_cu_ptr, dropped_cu_ptr, target_ptr,
    M, CK, B, STEPS, sk_t, sk_c,
    F32: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CK: tl.constexpr,
):
    """Program (dropped block): each dropped row's most similar kept row of its image (cosine of keys; the first
    maximum), as a position in ``kept``."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    valid = pos < M
    b = _image_of(dropped_cu_ptr, pos, B, STEPS)
    k_start = tl.load(kept_cu_ptr + b).to(tl.int64)
    k_end = tl.load(kept_cu_ptr + b + 1).to(tl.int64)
    lo = tl.min(tl.where(valid, k_start, 9223372036854775807), axis=0)
    hi = tl.max(tl.where(valid, k_end, 0), axis=0)
    drow = tl.load(dropped_ptr + pos, mask=valid, other=0)
    best = tl.full((BLOCK_J,), float("-inf"), dtype=tl.float32)
    best_pos = k_start
    for k0 in range(lo, hi, BLOCK_K):
        kpos = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        krow = tl.load(kept_ptr + kpos, mask=kpos < hi, other=0)
        dot = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
        norm_j = tl.zeros((BLOCK_J,), dtype=tl.float32)
        norm_k = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, CK, BLOCK_CK):
            offs_c = c0 + tl.arange(0, BLOCK_CK).to(tl.int64)
            a = tl.load(keys_ptr + drow[:, None] * sk_t + offs_c[None, :] * sk_c,
                        mask=valid[:, None] & (offs_c < CK)[None, :], other=0.0)
            c = tl.load(keys_ptr + krow[:, None] * sk_t + offs_c[None, :] * sk_c,
                        mask=(kpos < hi)[:, None] & (offs_c < CK)[None, :], other=0.0)
            dot += _dot_nt(a, c, F32)
            a32 = a.to(tl.float32)
            c32 = c.to(tl.float32)
            norm_j += tl.sum(a32 * a32, axis=1)
            norm_k += tl.sum(c32 * c32, axis=1)
        sim = dot / (tl.maximum(tl.sqrt(norm_j), 1e-12)[:, None] * tl.maximum(tl.sqrt(norm_k), 1e-12)[None, :])
        sim = tl.where(sim != sim, float("inf"), sim)  # a NaN similarity ranks first, as in argmax
        pair = (kpos[None, :] >= k_start[:, None]) & (kpos[None, :] < k_end[:, None])
        sim = tl.where(pair, sim, float("-inf"))
        top = tl.max(sim, axis=1)
        first = tl.min(tl.where(pair & (sim == top[:, None]), kpos[None, :], 9223372036854775807), axis=1)
        better = top > best  # strictly: an equal maximum in a later tile has a higher position
        best_pos = tl.where(better, first, best_pos)
        best = tl.where(better, top, best)
    tl.store(target_ptr + pos, best_pos, mask=valid)


@triton.jit
def _merge_accumulate_kernel(
    hidden_ptr, sizes_ptr, kept_ptr, dropped_ptr, kept_cu_ptr, dropped_cu_ptr, target_ptr, out_ptr, size_out_ptr,
    C, B, STEPS, sh_t, sh_c, ss,
    HAS_SIZES: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (kept position i, channel block): (s_i·h_i + Σ_{j→i} s_j·h_j) / (s_i + Σ_{j→i} s_j), the dropped
    rows j of i's image taken in ascending order."""
    i = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    b = _image_of(kept_cu_ptr, i, B, STEPS)
    d_start = tl.load(dropped_cu_ptr + b).to(tl.int64)
    d_end = tl.load(dropped_cu_ptr + b + 1).to(tl.int64)
    row = tl.load(kept_ptr + i)
    weight = tl.full((), 1.0, dtype=tl.float32)
    if HAS_SIZES:
        weight = tl.load(sizes_ptr + row * ss).to(tl.float32)
    acc = weight * tl.load(hidden_ptr + row * sh_t + offs_c * sh_c, mask=mask_c, other=0.0).to(tl.float32)
    for j0 in range(d_start, d_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        target = tl.load(target_ptr + offs_j, mask=offs_j < d_end, other=-1)
        match = (target == i).to(tl.int32)
        for _ in range(tl.sum(match, axis=0)):
            j = tl.min(tl.where(match != 0, offs_j, 9223372036854775807), axis=0)  # the next match, ascending
            drow = tl.load(dropped_ptr + j)
            s = tl.full((), 1.0, dtype=tl.float32)
            if HAS_SIZES:
                s = tl.load(sizes_ptr + drow * ss).to(tl.float32)
            acc += s * tl.load(hidden_ptr + drow * sh_t + offs_c * sh_c, mask=mask_c, other=0.0).to(tl.float32)
            weight += s
            match = tl.where(offs_j == j, 0, match)
    tl.store(out_ptr + i * C + offs_c, (acc / weight).to(out_ptr.dtype.element_ty), mask=mask_c)
    if tl.program_id(1) == 0:
        tl.store(size_out_ptr + i, weight)


BLOCK_J = 32  # dropped rows per tile
BLOCK_K = 32  # kept rows per tile
BLOCK_CK = 64  # key channels per step
BLOCK_C = 128  # hidden channels per program


def merge_nearest(
    hidden: Tensor, keys: Tensor, kept: Tensor, dropped: Tensor, kept_cu: Tensor, dropped_cu: Tensor,
    sizes: Tensor | None, wrap=lambda kernel: kernel,
) -> tuple[Tensor, Tensor]:
    """merged (K, C) in hidden's dtype and sizes_out (K,) float32 (see the reference). hidden (T, C), keys
    (T, Ck) and sizes (T,) may have any strides; kept, dropped int64 with offsets kept_cu, dropped_cu (B + 1,)."""
    n_kept, n_dropped = kept.shape[0], dropped.shape[0]
    channels, key_channels = hidden.shape[1], keys.shape[1]
    batch = kept_cu.numel() - 1
    steps = max(batch - 1, 0).bit_length()
    merged = hidden.new_empty((n_kept, channels))
    size_out = torch.empty((n_kept,), dtype=torch.float32, device=hidden.device)
    target = torch.empty((n_dropped,), dtype=torch.int64, device=hidden.device)
    if n_dropped > 0 and n_kept > 0:
        wrap(_merge_assign_kernel)[(triton.cdiv(n_dropped, BLOCK_J),)](
            keys, kept, dropped, kept_cu, dropped_cu, target, n_dropped, key_channels, batch, steps, *keys.stride(),
            F32=_f32_dot(keys), BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K, BLOCK_CK=BLOCK_CK,
        )
    if n_kept > 0:
        wrap(_merge_accumulate_kernel)[(n_kept, max(1, triton.cdiv(channels, BLOCK_C)))](
            hidden, sizes if sizes is not None else hidden, kept, dropped, kept_cu, dropped_cu, target, merged,
            size_out, channels, batch, steps, *hidden.stride(), sizes.stride(0) if sizes is not None else 0,
            HAS_SIZES=sizes is not None, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C,
        )
    return merged, size_out

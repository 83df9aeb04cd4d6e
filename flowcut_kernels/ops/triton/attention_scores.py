"""Triton attention_scores (:mod:`flowcut_kernels.ops.primitives`; what it computes: the "Generic primitives" section
of :mod:`flowcut_kernels.ops.reference`).

Two launches, no atomics:
  1. grid (B·Hkv, row blocks): the query rows of the ``group = Hq / Hkv`` heads that read key head kh,
     stacked (group·Q rows, GQA without repeating k), against every key chunk of S: an online softmax per
     row (max and Σexp rescaled chunk by chunk, masked keys −inf) gives each row's log-sum-exp, written
     to a (B, Hq·Q) float32 scratch;
  2. grid (B, span blocks): per block of span columns, every key head's chunk is read once and each row's
     logits recomputed on it; exp(l − lse) summed over the rows and heads, divided by Hq·Q.

Every address is computed in int64. Dots: see :mod:`.dots`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dots import block_d, dot_nt, f32_dot, online


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
        x = dot_nt(q, k, F32) * scale
        valid = _key_valid(mask_ptr, b, offs_s, S, sm_b, sm_s, HAS_MASK)
        m, z = online(m, z, tl.where(valid[None, :], x, float("-inf")))
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
            p = tl.exp(dot_nt(q, k, F32) * scale - lse[:, None])  # 0 on the rows past n_rows
            # masked keys add 0, except in a NaN row (a NaN logit: softmax makes the whole row NaN)
            acc += tl.sum(tl.where(valid[None, :] | (lse != lse)[:, None], p, 0.0), axis=0)
    tl.store(out_ptr + b * (span_end - span_start) + cols - span_start, acc / (HKV * n_rows), mask=in_span)


BLOCK_S = 64  # keys (columns) per tile
MAX_BLOCK_M = 64  # query rows per tile



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
    meta = {"HAS_MASK": key_mask is not None, "F32": f32_dot(q, k), "BLOCK_M": block_m, "BLOCK_S": BLOCK_S,
            "BLOCK_D": block_d(dim)}
    wrap(_attn_lse_kernel)[(batch * kv_heads, triton.cdiv(group * rows, block_m))](
        q, k, mask_arg, lse, seq, rows, dim, kv_heads, group, scale, *strides, **meta
    )
    wrap(_attn_mean_kernel)[(batch, triton.cdiv(span_end - span_start, BLOCK_S))](
        q, k, mask_arg, lse, out, seq, rows, dim, kv_heads, group, scale, span_start, span_end, *strides, **meta
    )
    return out


# --- text_guided_scores ----------------------------------------------------------------------------------

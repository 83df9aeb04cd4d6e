"""Triton text_guided_scores (:mod:`flowcut_kernels.ops.primitives`; what it computes: the "Generic primitives" section
of :mod:`flowcut_kernels.ops.reference`).

The two steps of :mod:`.attention_scores` per segment: grid (G, Hkv) for the log-sum-exps of the relevance
rows (the group query heads of key head kh, over the segment's keys) and of the semantic row (v_relay of
kh over the segment's values); then grid (G, chunks) for the scores, with ρ from the head-summed values
of the chunk. The segments (b, start, end, output offset) go to the device as one small int64 table.

Every address is computed in int64. Dots: see :mod:`.dots`.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dots import block_d, dot_nt, f32_dot, online


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
        m, z = online(m, z, tl.where(valid[None, :], dot_nt(q, k, F32) * scale, float("-inf")))
        v = _kv_tile(v_ptr, b, kh, offs_s, end, D, sv_b, sv_h, sv_s, sv_d, BLOCK_D).to(tl.float32)
        sem = tl.sum(v * vr[None, :], axis=1) * scale
        m_sem, z_sem = online(m_sem, z_sem, tl.where(valid, sem, float("-inf"))[None, :])
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
        rel += tl.sum(tl.exp(dot_nt(q, k, F32) * scale - lse[:, None]), axis=0)  # 0 on the rows past GROUP
        v = _kv_tile(v_ptr, b, kh, offs_s, end, D, sv_b, sv_h, sv_s, sv_d, BLOCK_D).to(tl.float32)
        vr = tl.load(vr_ptr + b * sr_b + kh * sr_h + offs_d * sr_d, mask=offs_d < D, other=0.0).to(tl.float32)
        sem += tl.exp(tl.sum(v * vr[None, :], axis=1) * scale - tl.load(lse_sem_ptr + g * HKV + kh))
        v_sum += v
    rho = tl.sum(tl.abs(v_sum / HKV), axis=1)  # the mean over the Hq heads is the mean over the Hkv heads
    score = (rel / (HKV * GROUP) + sem / HKV) * rho
    tl.store(out_ptr + out0 + offs_s - start, score, mask=valid)


BLOCK_S = 64  # keys per tile


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
    meta = {"F32": f32_dot(q_relay, k), "BLOCK_M": max(16, triton.next_power_of_2(group)), "BLOCK_S": BLOCK_S,
            "BLOCK_D": block_d(dim)}
    wrap(_text_lse_kernel)[(len(triples), kv_heads)](*args, *scalars, **meta)
    wrap(_text_score_kernel)[(len(triples), triton.cdiv(max(lengths), BLOCK_S))](*args, out, *scalars, **meta)
    return out

"""Triton merge_nearest (:mod:`flowcut_kernels.ops.primitives`; what it computes: the "Generic primitives" section of
:mod:`flowcut_kernels.ops.reference`).

Two launches, deterministic, no atomics:
  1. assign, grid (dropped blocks,): each dropped row finds its image (binary search in dropped_cu) and
     scans the kept rows of its image in tiles: dots of the keys over Ck chunks with both rows' norms
     accumulated alongside, cosine = dot / (max(|a|, 1e-12)·max(|b|, 1e-12)); the first maximum (a NaN
     similarity ranks first, as argmax) is its target position in ``kept`` (int64 scratch);
  2. accumulate, grid (K, channel blocks): each program owns one kept row, scans the targets of its
     image's dropped rows and adds s_j·h_j of each match in ascending dropped order, then divides.

Every address is computed in int64. Dots: see :mod:`.dots`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dots import dot_nt, f32_dot


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
            dot += dot_nt(a, c, F32)
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
            F32=f32_dot(keys), BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K, BLOCK_CK=BLOCK_CK,
        )
    if n_kept > 0:
        wrap(_merge_accumulate_kernel)[(n_kept, max(1, triton.cdiv(channels, BLOCK_C)))](
            hidden, sizes if sizes is not None else hidden, kept, dropped, kept_cu, dropped_cu, target, merged,
            size_out, channels, batch, steps, *hidden.stride(), sizes.stride(0) if sizes is not None else 0,
            HAS_SIZES=sizes is not None, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C,
        )
    return merged, size_out

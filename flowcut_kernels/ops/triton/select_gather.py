"""Triton select_gather: top-`keep` by cumulative score, ascending order, gather — one launch.

Grid (B, ⌈C / BLOCK_C⌉): each program selects for its image and copies one column block of the
kept hidden rows (row-contiguous tiles, so loads and stores are wide and coalesced); the programs
of column block 0 also write the gathered scores and index map.

Selection without a sort: scores map to order-preserving 32-bit keys (+0.0 and −0.0 equal; every NaN,
whatever its sign or payload, one key above +inf, as torch.sort ranks NaN), a bitwise binary search
finds the key t of the n_keep-th largest score, and a compaction pass keeps every key > t plus the
lowest-indexed keys == t that are still needed (ties → lower index), writing each kept token at its
running count — which is its ascending original position. Addresses are computed in int64.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _keys(cum_ptr, b, offs, N, sc_b, sc_n):
    """Order-preserving keys in [0, 2^32) of cum[b, offs] (int64 b, offs) as int64; −1 past the end."""
    x = tl.load(cum_ptr + b * sc_b + offs * sc_n, mask=offs < N, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # −0.0 ties with +0.0, as in a float sort
    bits = tl.where(x != x, 0x7FFFFFFF, x.to(tl.int32, bitcast=True))  # any NaN: the top key, 2^32 − 1
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
    return tl.where(offs < N, ordered, -1)


@triton.jit
def _count_at_least(cum_ptr, b, N, sc_b, sc_n, t, BLOCK: tl.constexpr):
    """How many of image b's N keys are >= t."""
    count = 0
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK).to(tl.int64)
        count += tl.sum((_keys(cum_ptr, b, offs, N, sc_b, sc_n) >= t).to(tl.int32), axis=0)
    return count


@triton.jit
def _select_gather_kernel(
    hidden_ptr, cum_ptr, idx_ptr, out_ptr, cum_out_ptr, idx_out_ptr,
    N, C, n_keep,
    sh_b, sh_s, sh_c, sc_b, sc_n, si_b, si_n,
    HAS_CLS: tl.constexpr, BLOCK_SEARCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (b, column block): select image b's n_keep candidates, copy their rows' BLOCK_C channels."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    rows_out = n_keep + FIRST
    # t: the largest key with at least n_keep keys >= t (the n_keep-th largest key).
    t = tl.zeros((), dtype=tl.int64)
    if N <= BLOCK_SEARCH:  # every key fits one block: load them once
        keys = _keys(cum_ptr, b, tl.arange(0, BLOCK_SEARCH).to(tl.int64), N, sc_b, sc_n)
        for bit in tl.static_range(31, -1, -1):
            cand = t | (1 << bit)
            t = tl.where(tl.sum((keys >= cand).to(tl.int32), axis=0) >= n_keep, cand, t)
        ties_needed = n_keep - tl.sum((keys > t).to(tl.int32), axis=0)
    else:
        for bit in tl.static_range(31, -1, -1):
            cand = t | (1 << bit)
            t = tl.where(_count_at_least(cum_ptr, b, N, sc_b, sc_n, cand, BLOCK_SEARCH) >= n_keep, cand, t)
        ties_needed = n_keep - _count_at_least(cum_ptr, b, N, sc_b, sc_n, t + 1, BLOCK_SEARCH)
    ties_seen = 0
    kept_seen = 0
    column_block = tl.zeros((BLOCK_N,), dtype=tl.int32) + tl.program_id(1)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        key = _keys(cum_ptr, b, offs, N, sc_b, sc_n)
        tie = (key == t).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
        kept = (key > t) | ((tie == 1) & (tie_rank < ties_needed))  # none when n_keep = 0
        kept_i = kept.to(tl.int32)
        pos = kept_seen + tl.cumsum(kept_i, axis=0) - kept_i  # rank among kept = ascending position
        ties_seen += tl.sum(tie, axis=0)
        kept_seen += tl.sum(kept_i, axis=0)
        tile_mask = kept[:, None] & mask_c[None, :]
        rows = tl.load(
            hidden_ptr + b * sh_b + (offs[:, None] + FIRST) * sh_s + offs_c[None, :] * sh_c, mask=tile_mask
        )
        tl.store(out_ptr + (b * rows_out + pos[:, None] + FIRST) * C + offs_c[None, :], rows, mask=tile_mask)
        scores_mask = kept & (column_block == 0)  # one column block writes the scores
        score = tl.load(cum_ptr + b * sc_b + offs * sc_n, mask=scores_mask)
        tl.store(cum_out_ptr + b * n_keep + pos, score, mask=scores_mask)
        index = tl.load(idx_ptr + b * si_b + offs * si_n, mask=scores_mask)
        tl.store(idx_out_ptr + b * n_keep + pos, index, mask=scores_mask)
    if HAS_CLS:  # the relay row stays first
        relay = tl.load(hidden_ptr + b * sh_b + offs_c * sh_c, mask=mask_c)
        tl.store(out_ptr + b * rows_out * C + offs_c, relay, mask=mask_c)


BLOCK_N = 64  # tokens per gather tile (a BLOCK_N x BLOCK_C tile of hidden rows)
BLOCK_C = 128
MAX_BLOCK_SEARCH = 1024  # scores per step of the threshold search (all of them for N <= 1024)


def select_gather_into(
    hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int, has_cls: bool,
    hidden_out: Tensor, cum_out: Tensor, index_out: Tensor, *, wrap=lambda kernel: kernel,
) -> None:
    """Write the kept rows into hidden_out (B, keep, C), cum_out and index_out (B, K), contiguous.

    hidden (B, S, C), cum (B, N) float32 and index_map (B, N) int64 may have any strides;
    K = keep − 1 with the relay row (``has_cls``) else keep. ``wrap`` is applied to the kernel
    before launch (``wrap_triton`` when traced as a ``triton_op``).
    """
    batch, _, channels = hidden.shape
    n = cum.shape[1]
    grid = (batch, triton.cdiv(channels, BLOCK_C))
    wrap(_select_gather_kernel)[grid](
        hidden, cum, index_map, hidden_out, cum_out, index_out,
        n, channels, keep - 1 if has_cls else keep,
        *hidden.stride(), *cum.stride(), *index_map.stride(),
        HAS_CLS=has_cls, BLOCK_SEARCH=min(triton.next_power_of_2(n), MAX_BLOCK_SEARCH),
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
    )


def select_gather_outputs(hidden: Tensor, cum: Tensor, keep: int, has_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised (hidden_out, cum_out, index_out) of the shapes :func:`select_gather_into` writes."""
    batch, _, channels = hidden.shape
    n_keep = keep - 1 if has_cls else keep
    return (
        hidden.new_empty((batch, keep, channels)),
        cum.new_empty((batch, n_keep)),
        torch.empty((batch, n_keep), dtype=torch.int64, device=cum.device),
    )

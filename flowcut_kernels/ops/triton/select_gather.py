"""Triton select_gather: top-`keep` by cumulative score, ascending order, gather — one launch, dense or packed.

Grid (B, ⌈C / BLOCK_C⌉): each program selects for its image and copies one column block of the
kept hidden rows (row-contiguous tiles, so loads and stores are wide and coalesced); the programs
of column block 0 also write the gathered scores and index map. A dense batch has hidden (B, S, C)
and one ``keep``; a packed (varlen) batch has hidden (T, C) with image b on rows cu_seqlens[b] …
cu_seqlens[b+1], read as a batch sharing one slab (batch stride 0), and each image's kept rows given
by cu_seqlens_out (built on the host from the keep counts): the same kernel, per-image starts and
lengths from :func:`~.flow_scores.segment`.

Selection without a sort (:mod:`.select`, shared with topk_select): the key t of the n_keep-th largest score,
then a compaction pass keeps every key > t plus the lowest-indexed keys == t that are still needed (ties →
lower index), writing each kept token at its running count — which is its ascending original position.
Addresses are computed in int64.
"""

from itertools import accumulate

import torch
import triton
import triton.language as tl
from torch import Tensor

from .flow_scores import segment
from .select import kth_key, row_keys


@triton.jit
def _select_gather_kernel(
    hidden_ptr, cum_ptr, idx_ptr, cu_ptr, cu_out_ptr, out_ptr, cum_out_ptr, idx_out_ptr,
    S, C, keep,
    sh_b, sh_s, sh_c, sc_b, sc_n, si_b, si_n,
    HAS_CLS: tl.constexpr, VARLEN: tl.constexpr, BLOCK_SEARCH: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (b, column block): select image b's n_keep candidates, copy their rows' BLOCK_C channels.

    Image b: S rows from cu[b] (VARLEN) or b·S, keep output rows from cu_out[b] (VARLEN) or b·keep."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    b = tl.program_id(0).to(tl.int64)
    start, length = segment(cu_ptr, b, S, VARLEN)
    out_start, rows_out = segment(cu_out_ptr, b, keep, VARLEN)
    N = length - FIRST
    n_keep = rows_out - FIRST
    row0 = start if VARLEN else 0  # the image's row 0 and candidate 0 in its slab
    cand0 = start - b * FIRST if VARLEN else 0
    hidden = hidden_ptr + b * sh_b + row0 * sh_s
    cum = cum_ptr + b * sc_b + cand0 * sc_n
    idx = idx_ptr + b * si_b + cand0 * si_n
    out = out_ptr + out_start * C
    out_cand = out_start - b * FIRST  # the image's first kept candidate in cum_out and idx_out
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    t, ties_needed = kth_key(cum, cum, 0, N, sc_n, 0, n_keep, False, BLOCK_SEARCH)
    ties_seen = 0
    kept_seen = 0
    column_block = tl.zeros((BLOCK_N,), dtype=tl.int32) + tl.program_id(1)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        key, _ = row_keys(cum, cum, offs, N, sc_n, 0, False)
        tie = (key == t).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
        kept = (key > t) | ((tie == 1) & (tie_rank < ties_needed))  # none when n_keep = 0
        kept_i = kept.to(tl.int32)
        pos = kept_seen + tl.cumsum(kept_i, axis=0) - kept_i  # rank among kept = ascending position
        ties_seen += tl.sum(tie, axis=0)
        kept_seen += tl.sum(kept_i, axis=0)
        tile_mask = kept[:, None] & mask_c[None, :]
        rows = tl.load(hidden + (offs[:, None] + FIRST) * sh_s + offs_c[None, :] * sh_c, mask=tile_mask)
        tl.store(out + (pos[:, None] + FIRST) * C + offs_c[None, :], rows, mask=tile_mask)
        scores_mask = kept & (column_block == 0)  # one column block writes the scores
        tl.store(cum_out_ptr + out_cand + pos, tl.load(cum + offs * sc_n, mask=scores_mask), mask=scores_mask)
        tl.store(idx_out_ptr + out_cand + pos, tl.load(idx + offs * si_n, mask=scores_mask), mask=scores_mask)
    if HAS_CLS:  # the relay row stays first
        tl.store(out + offs_c, tl.load(hidden + offs_c * sh_c, mask=mask_c), mask=mask_c)


BLOCK_N = 64  # tokens per gather tile (a BLOCK_N x BLOCK_C tile of hidden rows)
BLOCK_C = 128
MAX_BLOCK_SEARCH = 1024  # scores per step of the threshold search (all of them for N <= 1024)


def select_gather_into(
    hidden: Tensor, cum: Tensor, index_map: Tensor, has_cls: bool, hidden_out: Tensor, cum_out: Tensor,
    index_out: Tensor, cu_seqlens_out: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
    wrap=lambda kernel: kernel,
) -> None:
    """Write the kept rows into hidden_out, cum_out and index_out, contiguous (from :func:`select_gather_outputs`).

    Dense batch: hidden (B, S, C), cum (B, N) float32 and index_map (B, N) int64; keep = hidden_out.shape[1].
    Packed batch (``cu_seqlens`` (B + 1,) given): hidden (T, C), cum and index_map (T_c,), each image's kept
    rows from cu_seqlens_out. Inputs may have any strides; K_b = keep_b − 1 with the relay row (``has_cls``)
    else keep_b. ``wrap`` is applied to the kernel before launch (``wrap_triton`` when traced as a ``triton_op``).
    """
    packed = cu_seqlens is not None
    if packed:  # one slab shared by the images (batch stride 0)
        batch = cu_seqlens.numel() - 1
        seq = keep = 0  # not read: each image's from cu_seqlens and cu_seqlens_out
        longest = cum.shape[0] - (batch - 1)  # the most candidates one image can have
        strides = (0, *hidden.stride(), 0, *cum.stride(), 0, *index_map.stride())
    else:
        batch, seq, _ = hidden.shape
        keep = hidden_out.shape[1]
        longest = cum.shape[1]
        strides = (*hidden.stride(), *cum.stride(), *index_map.stride())
    channels = hidden.shape[-1]
    grid = (batch, triton.cdiv(channels, BLOCK_C))
    wrap(_select_gather_kernel)[grid](
        hidden, cum, index_map, cu_seqlens if packed else cum, cu_seqlens_out if packed else cum,
        hidden_out, cum_out, index_out, seq, channels, keep, *strides,
        HAS_CLS=has_cls, VARLEN=packed, BLOCK_SEARCH=min(triton.next_power_of_2(longest), MAX_BLOCK_SEARCH),
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
    )


def select_gather_outputs(
    hidden: Tensor, cum: Tensor, keep: int | list[int], has_cls: bool, cu_seqlens: Tensor | None = None
) -> tuple[Tensor, ...]:
    """The outputs :func:`select_gather_into` writes, uninitialised: hidden_out (B, keep, C), cum_out and
    index_out (B, K) for a dense batch; for a packed one (``cu_seqlens`` given, ``keep`` B ints) hidden_out
    (Σ keep, C), cum_out and index_out (Σ K_b,), then cu_seqlens_out (B + 1,), the kept rows' offsets in
    cu_seqlens' dtype, filled here from ``keep`` (the kernel reads it)."""
    if cu_seqlens is None:
        batch, _, channels = hidden.shape
        rows, kept = (batch, keep), (batch, keep - int(has_cls))
    else:
        channels = hidden.shape[1]
        rows, kept = (sum(keep),), (sum(keep) - len(keep) * int(has_cls),)
    out = (
        hidden.new_empty((*rows, channels)),
        cum.new_empty(kept),
        torch.empty(kept, dtype=torch.int64, device=cum.device),
    )
    if cu_seqlens is None:
        return out
    offsets = torch.tensor(list(accumulate(keep, initial=0)), dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return (*out, offsets)

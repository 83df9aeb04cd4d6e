"""Triton select_gather: top-`keep` by cumulative score, ascending order, gather — two launches, dense or packed.

1. grid (B,): each program selects once for its image, writes the kept scores and index map, and records
   each of the image's output rows' source (the element offset of its hidden row) in an int64 scratch;
2. grid (⌈rows out / BLOCK_R⌉, ⌈C / BLOCK_C⌉): every output row of the batch copied from its source in
   row-contiguous tiles (wide, coalesced loads and stores), however the rows fall into images.
A dense batch has hidden (B, S, C) and one ``keep``; a packed (varlen) batch has hidden (T, C) with image b on
rows cu_seqlens[b] … cu_seqlens[b+1], read as a batch sharing one slab (batch stride 0), and each image's kept
rows given by cu_seqlens_out (built on the host from the keep counts): the same kernels, per-image starts and
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
def _select_rows_kernel(
    cum_ptr, idx_ptr, cu_ptr, cu_out_ptr, src_ptr, cum_out_ptr, idx_out_ptr,
    S, keep,
    sh_b, sh_s, sc_b, sc_n, si_b, si_n,
    HAS_CLS: tl.constexpr, VARLEN: tl.constexpr, BLOCK_SEARCH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program b: select image b's n_keep candidates once; write their scores and indices, and each of the image's
    output rows' source (the element offset of its hidden row, relay row first) to src.

    Image b: S rows from cu[b] (VARLEN) or b·S, keep output rows from cu_out[b] (VARLEN) or b·keep."""
    FIRST: tl.constexpr = 1 if HAS_CLS else 0
    b = tl.program_id(0).to(tl.int64)
    start, length = segment(cu_ptr, b, S, VARLEN)
    out_start, rows_out = segment(cu_out_ptr, b, keep, VARLEN)
    N = length - FIRST
    n_keep = rows_out - FIRST
    row0 = start if VARLEN else 0  # the image's row 0 and candidate 0 in its slab
    cand0 = start - b * FIRST if VARLEN else 0
    image = b * sh_b + row0 * sh_s  # the image's row 0 in hidden, in elements
    cum = cum_ptr + b * sc_b + cand0 * sc_n
    idx = idx_ptr + b * si_b + cand0 * si_n
    out_cand = out_start - b * FIRST  # the image's first kept candidate in cum_out and idx_out
    t, ties_needed = kth_key(cum, cum, 0, N, sc_n, 0, n_keep, False, BLOCK_SEARCH)
    ties_seen = 0
    kept_seen = 0
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
        tl.store(src_ptr + out_start + FIRST + pos, image + (offs + FIRST) * sh_s, mask=kept)
        tl.store(cum_out_ptr + out_cand + pos, tl.load(cum + offs * sc_n, mask=kept), mask=kept)
        tl.store(idx_out_ptr + out_cand + pos, tl.load(idx + offs * si_n, mask=kept), mask=kept)
    if HAS_CLS:  # the relay row stays first
        tl.store(src_ptr + out_start, image)


@triton.jit
def _gather_rows_kernel(
    hidden_ptr, src_ptr, out_ptr, R, C, sh_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (row block, column block): BLOCK_R output rows' BLOCK_C channels from their sources."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_r = offs_r < R
    mask = mask_r[:, None] & (offs_c < C)[None, :]
    src = tl.load(src_ptr + offs_r, mask=mask_r, other=0)
    rows = tl.load(hidden_ptr + src[:, None] + offs_c[None, :] * sh_c, mask=mask)
    tl.store(out_ptr + offs_r[:, None] * C + offs_c[None, :], rows, mask=mask)


BLOCK_N = 64  # candidates per compaction step
BLOCK_R = 64  # output rows per gather tile (a BLOCK_R x BLOCK_C tile of hidden rows)
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
        strides = (0, hidden.stride(0), 0, *cum.stride(), 0, *index_map.stride())
    else:
        batch, seq, _ = hidden.shape
        keep = hidden_out.shape[1]
        longest = cum.shape[1]
        strides = (*hidden.stride()[:2], *cum.stride(), *index_map.stride())
    channels = hidden.shape[-1]
    rows_out = hidden_out.shape[0] if packed else batch * keep
    src = torch.empty((rows_out,), dtype=torch.int64, device=hidden.device)  # each output row's source
    wrap(_select_rows_kernel)[(batch,)](
        cum, index_map, cu_seqlens if packed else cum, cu_seqlens_out if packed else cum, src, cum_out, index_out,
        seq, keep, *strides,
        HAS_CLS=has_cls, VARLEN=packed, BLOCK_SEARCH=min(triton.next_power_of_2(longest), MAX_BLOCK_SEARCH),
        BLOCK_N=BLOCK_N,
    )
    if rows_out and channels:
        grid = (triton.cdiv(rows_out, BLOCK_R), triton.cdiv(channels, BLOCK_C))
        wrap(_gather_rows_kernel)[grid](
            hidden, src, hidden_out, rows_out, channels, hidden.stride(-1), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
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

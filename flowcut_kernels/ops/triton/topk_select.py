"""Triton topk_select (:mod:`flowcut_kernels.ops.primitives`; what it computes: the "Generic primitives" section of
:mod:`flowcut_kernels.ops.reference`).

Grid (B,), one program per image: the scores (fp16/bf16 widened to fp32) map to
order-preserving 32-bit keys (−0.0 = +0.0, every NaN one key above +inf; protected rows −1, out of the
contest), a bitwise search finds the keep[b]-th largest key t, and a compaction writes the kept rows
(protected, key > t, the lowest-indexed ties still needed) and the dropped rows at their running counts
(ascending order). With ``protect`` the output sizes depend on the data: the total kept count
(Σ keep + the protected rows) is read on the host once (one scalar, an unbacked size when traced); the
per-image offsets are computed on the device. Without it nothing is read on the host.

The threshold search is :func:`.select.kth_key`, shared with select_gather.

Every address is computed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .select import kth_key, row_keys


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
    t, ties_needed = kth_key(scores_ptr, prot_ptr, start, end, ss, sp, n_keep, HAS_PROTECT, BLOCK_SEARCH)
    ties_seen = 0
    kept_seen = 0
    dropped_seen = 0
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        key, protected = row_keys(scores_ptr, prot_ptr, offs, end, ss, sp, HAS_PROTECT)
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

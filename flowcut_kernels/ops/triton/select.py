"""The selection shared by the Triton select_gather and topk_select kernels, without a sort: scores map to
order-preserving 32-bit keys (+0.0 and −0.0 equal; every NaN, whatever its sign or payload, one key above +inf, as
torch.sort ranks NaN), and a bitwise binary search finds the key t of the n_keep-th largest score; the callers'
compaction then keeps every key > t plus the lowest-indexed keys == t still needed (ties → lower index).
Addresses are computed in int64.
"""

import triton
import triton.language as tl


@triton.jit
def row_keys(ptr, prot_ptr, offs, end, stride, prot_stride, HAS_PROTECT: tl.constexpr):
    """Rows offs (int64, < end) of ptr (fp16/bf16/fp32, widened exactly to fp32): order-preserving keys in
    [0, 2^32) (int64) of the free rows, −1 for protected rows (prot_ptr, HAS_PROTECT) and past end; and which rows
    are protected."""
    in_range = offs < end
    x = tl.load(ptr + offs * stride, mask=in_range, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # −0.0 ties with +0.0
    bits = tl.where(x != x, 0x7FFFFFFF, x.to(tl.int32, bitcast=True))  # any NaN: the top key, 2^32 − 1
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
    protected = offs < 0  # none
    if HAS_PROTECT:
        protected = in_range & (tl.load(prot_ptr + offs * prot_stride, mask=in_range, other=0) != 0)
    return tl.where(in_range & ~protected, key, -1), protected


@triton.jit
def _count_at_least(ptr, prot_ptr, start, end, stride, prot_stride, t, HAS_PROTECT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """How many free rows of start … end − 1 have a key >= t."""
    count = 0
    for n0 in range(start, end, BLOCK):
        key, _ = row_keys(ptr, prot_ptr, n0 + tl.arange(0, BLOCK).to(tl.int64), end, stride, prot_stride,
                          HAS_PROTECT)
        count += tl.sum((key >= t).to(tl.int32), axis=0)
    return count


@triton.jit
def kth_key(ptr, prot_ptr, start, end, stride, prot_stride, n_keep, HAS_PROTECT: tl.constexpr,
            BLOCK_SEARCH: tl.constexpr):
    """Among the free rows start … end − 1: t, the largest key with at least n_keep keys >= t (the n_keep-th
    largest key), and how many rows with key == t are kept (the first ones). Rows of at most BLOCK_SEARCH are
    loaded once; longer ones are re-read for each of the 32 bits."""
    t = tl.zeros((), dtype=tl.int64)
    if end - start <= BLOCK_SEARCH:  # every key fits one block: load them once
        keys, _ = row_keys(ptr, prot_ptr, start + tl.arange(0, BLOCK_SEARCH).to(tl.int64), end, stride, prot_stride,
                           HAS_PROTECT)
        for bit in tl.static_range(31, -1, -1):
            cand = t | (1 << bit)
            t = tl.where(tl.sum((keys >= cand).to(tl.int32), axis=0) >= n_keep, cand, t)
        ties_needed = n_keep - tl.sum((keys > t).to(tl.int32), axis=0)
    else:
        for bit in tl.static_range(31, -1, -1):
            cand = t | (1 << bit)
            count = _count_at_least(ptr, prot_ptr, start, end, stride, prot_stride, cand, HAS_PROTECT, BLOCK_SEARCH)
            t = tl.where(count >= n_keep, cand, t)
        ties_needed = n_keep - _count_at_least(ptr, prot_ptr, start, end, stride, prot_stride, t + 1, HAS_PROTECT,
                                               BLOCK_SEARCH)
    return t, ties_needed

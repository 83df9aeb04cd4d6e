"""The generic primitives, every backend against the float64 oracle (tests/oracle/primitives.py), and their
input checks."""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import FlowCutInputError, ops
from oracle.primitives import (
    naive_attention_scores, naive_merge_nearest, naive_text_guided_scores, naive_topk_select,
)

HALF = (torch.float16, torch.bfloat16)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def dtypes_of(backend):
    return [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            if d in ops.backends.BACKENDS[backend].dtypes]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heads,kv_heads,rows", [(4, 4, 1), (4, 2, 3), (8, 2, 1)])
def test_attention_scores(backend, heads, kv_heads, rows):
    for n, dtype in enumerate(dtypes_of(backend)):
        q = randn(2, heads, rows, 8, seed=n, dtype=dtype, scale=2.0)
        k = randn(2, 19, kv_heads, 8, seed=n + 10, dtype=dtype, scale=2.0).transpose(1, 2)  # a strided view
        mask = torch.ones(2, 19, dtype=torch.bool)
        mask[1, 15:] = False  # image 1 is padded
        for key_mask, span in ((None, None), (mask, (3, 15))):
            got = ops.attention_scores(q, k, scale=8**-0.5, key_mask=key_mask, span=span, backend=backend)
            want = naive_attention_scores(q, k, 8**-0.5, key_mask, span)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-4 if dtype not in HALF else 2e-3, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows", [1, 12])  # 2 or 24 rows per key head: the native CPU kernel's two paths
def test_attention_scores_rows_that_softmax_makes_nan(backend, rows):
    """A query row with a NaN, or one whose logit is +inf, is NaN as softmax gives; so is every column of its image."""
    q, k = randn(3, 4, rows, 8, seed=1, scale=2.0), randn(3, 2, 20, 8, seed=2, scale=2.0)
    q[1, 0, 0, 3] = float("nan")
    q[2, 1, 0, 0] = float("inf")
    k[2, 0, 5, 0] = 1.0  # a +inf logit
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 3:] = False
    got = ops.attention_scores(q, k, scale=0.3, key_mask=mask, span=(2, 14), backend=backend)
    want = naive_attention_scores(q, k, 0.3, mask, (2, 14))
    assert want[1:].isnan().all() and not want[0].isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_text_guided_scores(backend, heads, kv_heads):
    segments = [(0, 3, 12), (1, 0, 5), (1, 7, 20), (0, 12, 13)]  # two images in sequence 1; a one-token image
    for n, dtype in enumerate(dtypes_of(backend)):
        k = randn(2, kv_heads, 20, 8, seed=n, dtype=dtype, scale=3.0)
        v = randn(2, 20, kv_heads, 8, seed=n + 1, dtype=dtype, scale=3.0).transpose(1, 2)
        q_t, v_t = randn(2, heads, 8, seed=n + 2, dtype=dtype, scale=3.0), v[:, :, -1]
        got = ops.text_guided_scores(q_t, v_t, k, v, segments, scale=8**-0.5, backend=backend)
        want = naive_text_guided_scores(q_t, v_t, k, v, segments, 8**-0.5)
        assert got.shape == (9 + 5 + 13 + 1,) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4 if dtype not in HALF else 2e-3, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_select_packed_with_ties_nan_and_protected_rows(backend):
    lengths = [7, 1, 12, 5]
    for n, dtype in enumerate(dtypes_of(backend)):
        g = torch.Generator().manual_seed(n)
        scores = (torch.rand(25, generator=g) * 4).floor().to(dtype)  # heavy ties
        scores[[2, 9]] = float("nan")
        scores[[3, 10]] = torch.tensor([-0.0, 0.0], dtype=dtype)
        scores[11] = float("inf")
        protect = torch.rand(25, generator=g) < 0.3
        cu = torch.tensor([0, 7, 8, 20, 25], dtype=torch.int32)
        for keep, mask in (([2, 1, 5, 0], None), ([1, 0, 3, 2], protect)):
            free = [n - (0 if mask is None else int(mask[s : s + n].sum())) for s, n in zip(cu.tolist(), lengths)]
            keep = [min(x, f) for x, f in zip(keep, free)]
            sel = ops.topk_select(scores, keep, protect=mask, cu_seqlens=cu, backend=backend)
            kept, dropped = naive_topk_select(scores, lengths, keep, mask)
            assert sel.kept.tolist() == kept and sel.dropped.tolist() == dropped
            assert sel.kept_cu.dtype == torch.int32 and sel.kept_cu.tolist()[-1] == len(kept)
            assert sel.dropped_cu.tolist()[-1] == len(dropped)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_topk_select_dense_with_a_span(backend):
    """FastV's case: image tokens 3 … 12 of each sequence compete, the text around them stays."""
    scores = randn(3, 16, seed=4)
    sel = ops.topk_select(scores, 4, span=(3, 13), backend=backend)
    assert sel.kept.shape == (3, 10) and sel.dropped.shape == (3, 6)
    protect = torch.ones(3, 16, dtype=torch.bool)
    protect[:, 3:13] = False
    kept, _ = naive_topk_select(scores.flatten(), [16] * 3, [4] * 3, protect.flatten())
    assert (sel.kept + torch.arange(3)[:, None] * 16).flatten().tolist() == kept
    assert torch.equal(sel.mask.sum(1), torch.full((3,), 10))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_sizes", [False, True])
def test_merge_nearest(backend, with_sizes):
    for n, dtype in enumerate(dtypes_of(backend)):
        hidden = randn(19, 2 * 5, seed=n, dtype=dtype)[:, ::2]  # a strided view
        keys = randn(19, 6, seed=n + 1, dtype=dtype)
        keys[5] = keys[2]  # two kept rows of image 0 equally similar to everything: the lower one wins
        sizes = torch.rand(19, generator=torch.Generator().manual_seed(n)) + 0.5 if with_sizes else None
        cu = torch.tensor([0, 9, 13, 19])
        protect = torch.zeros(19, dtype=torch.bool)
        protect[[2, 5]] = True
        sel = ops.topk_select(randn(19, seed=n + 2), [2, 4, 1], protect=protect, cu_seqlens=cu, backend=backend)
        merged, size_out = ops.merge_nearest(hidden, keys, sel, sizes=sizes, backend=backend)
        groups = [sel.kept[a:b].tolist() for a, b in zip(sel.kept_cu.tolist(), sel.kept_cu.tolist()[1:])]
        drops = [sel.dropped[a:b].tolist() for a, b in zip(sel.dropped_cu.tolist(), sel.dropped_cu.tolist()[1:])]
        assert drops[1] == []  # image 1 keeps everything
        want, want_size = naive_merge_nearest(hidden, keys, groups, drops, sizes)
        assert merged.dtype == dtype and size_out.dtype == torch.float32
        torch.testing.assert_close(merged.double(), want, rtol=1e-5 if dtype not in HALF else 1e-2, atol=1e-5 if
                                   dtype not in HALF else 1e-2)
        torch.testing.assert_close(size_out.double(), want_size, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_nearest_dense(backend):
    """Dense layout: a (B, N, C) batch, every image keeping the same count; sizes default to 1 (a plain mean)."""
    hidden, keys = randn(2, 10, 4, seed=5), randn(2, 10, 3, seed=6)
    sel = ops.topk_select(randn(2, 10, seed=7), 3, backend=backend)
    merged, sizes = ops.merge_nearest(hidden, keys, sel, backend=backend)
    assert merged.shape == (2, 3, 4) and torch.equal(sizes.sum(1), torch.full((2,), 10.0))
    for b in range(2):
        want, _ = naive_merge_nearest(hidden[b], keys[b], [sel.kept[b].tolist()], [sel.dropped[b].tolist()])
        torch.testing.assert_close(merged[b].double(), want, rtol=1e-5, atol=1e-6)


def test_opcheck():
    q, k = randn(2, 4, 2, 8), randn(2, 2, 11, 8)
    torch.library.opcheck(torch.ops.flowcut.attention_scores, (q, k, 0.3, None, 2, 9))
    torch.library.opcheck(torch.ops.flowcut.text_guided_scores, (q[:, :, 0], k[:, :, 0], k, k, [0, 2, 9, 1, 0, 3], 0.3))
    cu = torch.tensor([0, 6, 11])
    torch.library.opcheck(torch.ops.flowcut.topk_select, (randn(11), cu, [2, 3], None))
    sel = ops.topk_select(randn(11), [2, 3], cu_seqlens=cu)
    torch.library.opcheck(torch.ops.flowcut.merge_nearest,
                          (randn(11, 4), randn(11, 3), sel.kept, sel.dropped, sel.kept_cu, sel.dropped_cu, None))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(FlowCutInputError, match=match):
        fn(*args, **kwargs)


def test_bad_input_is_named():
    q, k = randn(2, 4, 1, 8), randn(2, 3, 11, 8)
    _raises("query heads must be a multiple of k's 3 key heads", ops.attention_scores, q, k, scale=0.3)
    k = randn(2, 2, 11, 8)
    _raises(r"span=\(5, 5\) must satisfy", ops.attention_scores, q, k, scale=0.3, span=(5, 5))
    _raises("key_mask leaves an image without any key", ops.attention_scores, q, k, scale=0.3,
            key_mask=torch.zeros(2, 11, dtype=torch.bool))
    _raises(r"key_mask must have shape \(B, S\)", ops.attention_scores, q, k, scale=0.3,
            key_mask=torch.ones(2, 10, dtype=torch.bool))
    _raises("scale must be a float", ops.attention_scores, q, k, scale=None)
    _raises(r"segments\[0\]=\(2, 0, 3\) must name a sequence b < 2", ops.text_guided_scores, q[:, :, 0], k[:, :, 0],
            k, k, [(2, 0, 3)], scale=0.3)
    _raises(r"segments\[0\] must be \(b, start, end\)", ops.text_guided_scores, q[:, :, 0], k[:, :, 0], k, k, [(0, 1)],
            scale=0.3)
    scores = randn(2, 10)
    _raises(r"keep\[0\]=11 is out of range: it must be \[0, 10\]", ops.topk_select, scores, 11)
    _raises(r"keep\[1\]=11 is out of range", ops.topk_select, scores, [2, 11])
    _raises(r"keep\[1\]=8 is out of range: it must be \[0, 7\]", ops.topk_select, scores, [2, 8], span=(0, 7))
    _raises("keep must hold one count per image", ops.topk_select, scores, [1, 2, 3])
    _raises("scores must be a floating tensor", ops.topk_select, scores.int(), 2)
    _raises("protect must have the shape of scores", ops.topk_select, scores, 2,
            protect=torch.zeros(2, 9, dtype=torch.bool))
    _raises("span applies to dense", ops.topk_select, scores.flatten(), [2, 2], span=(0, 3),
            cu_seqlens=torch.tensor([0, 10, 20]))
    _raises("cu_seqlens must end at the row count 20", ops.topk_select, scores.flatten(), [2, 2],
            cu_seqlens=torch.tensor([0, 10, 19]))
    protect = torch.zeros(2, 10, dtype=torch.bool)
    protect[0, 0] = True
    _raises("the images keep different numbers of rows", ops.topk_select, scores, 2, protect=protect)
    sel = ops.topk_select(scores, 0)
    _raises("an image has dropped rows but keeps none", ops.merge_nearest, randn(2, 10, 4), randn(2, 10, 4), sel)
    sel = ops.topk_select(scores, 3)
    _raises("keys must have hidden's rows", ops.merge_nearest, randn(2, 10, 4), randn(2, 9, 4), sel)

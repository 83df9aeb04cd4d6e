"""The "triton" backend's generic primitives (attention_scores, text_guided_scores, topk_select,
merge_nearest) against the reference and against the float64 oracle (tests/oracle/primitives.py).

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py), at small shapes; the torch.compile test
needs CUDA and is skipped without it. Indices and offsets must be equal; floats within the tolerances below
(every kernel computes in float32 from the inputs as given, so fp16/bf16 inputs change the inputs, not the
tolerance, except for merged rows stored back in fp16/bf16).
"""

import pytest
import torch

from oracle.primitives import naive_attention_scores, naive_merge_nearest, naive_text_guided_scores, naive_topk_select

from flowcut_kernels import FlowCutInputError, available_backends, ops, reference

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")
if "triton" not in available_backends("cpu") + available_backends("cuda"):
    pytest.skip(f"triton backend unavailable: {available_backends('cpu', reasons=True)}", allow_module_level=True)

from flowcut_kernels.ops.triton import attention_scores as t_attention
from flowcut_kernels.ops.triton import merge_nearest as t_merge
from flowcut_kernels.ops.triton import text_guided_scores as t_text
from flowcut_kernels.ops.triton import topk_select as t_topk

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCORE_TOL = {"rtol": 2e-5, "atol": 1e-7}  # float32 scores vs the reference and the float64 loops
ORACLE_TOL = {"rtol": 1e-4, "atol": 1e-6}  # vs float64: float32 rounding of logits ~10 and of their exps
MERGED_TOL = {  # one rounding to the output dtype
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}
OPS = ("attention_scores", "text_guided_scores", "topk_select", "merge_nearest")


def heads(b, s, h, d, dtype, g, scale=1.0):
    """(B, H, S, D) as a model hands it: a transposed view of (B, S, H, D)."""
    return (scale * torch.randn(b, s, h, d, generator=g)).to(dtype).transpose(1, 2).to(DEVICE)


def cu_seqlens(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def cpu(*tensors):
    """The tensors on the CPU (None stays None), for the float64 oracle (tests/oracle/primitives.py)."""
    return [None if t is None else t.cpu() for t in tensors]


# --------------------------------------------------------------------------------------------
# attention_scores


# (B, Hq, Hkv, Q, S, D): GQA 1, 2 and 4, Q = 1 and several rows (> 64 stacked rows: two row blocks)
ATTENTION_SHAPES = [(1, 1, 1, 1, 5, 4), (2, 4, 2, 3, 70, 8), (2, 8, 2, 1, 33, 16), (1, 4, 1, 20, 40, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_scores(dtype, shape):
    b, hq, hkv, rows, s, d = shape
    g = torch.Generator().manual_seed(s + hq)
    q = torch.randn(b, rows, hq, d, generator=g).mul(2).to(dtype).transpose(1, 2).to(DEVICE)  # strided
    k = heads(b, s, hkv, d, dtype, g)
    mask = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    mask[-1, s - s // 3 :] = False  # padding on the last image
    mask[0, 1] = False  # a hole
    for key_mask in (None, mask):
        for start, end in ((0, s), (1, s - 1), (s // 2, s // 2 + 1)):
            got = t_attention.attention_scores(q, k, d**-0.5, key_mask, start, end)
            assert got.dtype == torch.float32 and got.shape == (b, end - start) and got.is_contiguous()
            torch.testing.assert_close(got, reference.attention_scores(q, k, d**-0.5, key_mask, start, end),
                                       **SCORE_TOL)
            want = naive_attention_scores(*cpu(q, k), d**-0.5, *cpu(key_mask), (start, end))
            torch.testing.assert_close(got.double().cpu(), want, **ORACLE_TOL)
    full = t_attention.attention_scores(q, k, d**-0.5, mask, 0, s)
    assert torch.equal(full[~mask], torch.zeros_like(full[~mask]))
    torch.testing.assert_close(full.sum(-1), torch.ones(b, device=DEVICE), rtol=1e-5, atol=1e-5)


def test_attention_scores_long_sequence_and_large_logits():
    """Several key chunks with the maximum in a late one (the running sums rescaled), fp32 and mixed dtypes."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 2, 16, generator=g).to(DEVICE)
    k = heads(1, 200, 1, 16, torch.float32, g)
    k[:, :, 170] = 6 * q[0, 0, 0]  # one huge logit in the third chunk
    got = t_attention.attention_scores(q, k, 0.25, None, 100, 200)
    torch.testing.assert_close(got, reference.attention_scores(q, k, 0.25, None, 100, 200), **SCORE_TOL)
    want = naive_attention_scores(*cpu(q, k), 0.25, None, (100, 200))
    torch.testing.assert_close(got.double().cpu(), want, **ORACLE_TOL)
    # q float64, k float16: computed in fp32
    mixed = t_attention.attention_scores(q.double(), k.half(), 0.25, None, 0, 200)
    torch.testing.assert_close(mixed, reference.attention_scores(q.double(), k.half(), 0.25, None, 0, 200),
                               **SCORE_TOL)


# --------------------------------------------------------------------------------------------
# text_guided_scores


# (B, Hq, Hkv, S, D) and segments: lengths 1, > 64 (two chunks), several per sequence, out of order
TEXT_CASES = [
    ((1, 2, 2, 9, 4), [0, 0, 9]),
    ((2, 4, 2, 80, 8), [1, 5, 75, 0, 0, 1, 0, 10, 30]),
    ((2, 8, 2, 20, 16), [0, 2, 18, 1, 0, 20]),
    ((1, 4, 1, 12, 24), [0, 3, 4, 0, 4, 12]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,segments", TEXT_CASES)
def test_text_guided_scores(dtype, shape, segments):
    b, hq, hkv, s, d = shape
    g = torch.Generator().manual_seed(s + hq)
    q_relay = heads(b, 1, hq, d, dtype, g, 2.0)[:, :, 0]  # (B, Hq, D), strided
    v_relay = heads(b, 1, hkv, d, dtype, g, 2.0)[:, :, 0]
    k, v = heads(b, s, hkv, d, dtype, g, 2.0), heads(b, s, hkv, d, dtype, g)
    got = t_text.text_guided_scores(q_relay, v_relay, k, v, segments, d**-0.5)
    total = sum(segments[2::3]) - sum(segments[1::3])
    assert got.dtype == torch.float32 and got.shape == (total,)
    torch.testing.assert_close(got, reference.text_guided_scores(q_relay, v_relay, k, v, segments, d**-0.5),
                               **SCORE_TOL)
    want = naive_text_guided_scores(*cpu(q_relay, v_relay, k, v), list(zip(*[iter(segments)] * 3)), d**-0.5)
    torch.testing.assert_close(got.double().cpu(), want, **ORACLE_TOL)


def test_text_guided_scores_no_segments():
    k = torch.randn(1, 1, 4, 8, device=DEVICE)
    got = t_text.text_guided_scores(k[:, :, 0], k[:, :, 0], k, k, [], 0.3)
    assert got.shape == (0,) and got.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# topk_select


def nan_bits(dtype):
    """NaNs of several signs and payloads in ``dtype``."""
    if dtype == torch.float32:
        bits = torch.tensor([0x7FC00000, -0x00400000, 0x7F800001, 0x7FC12345], dtype=torch.int32)
        return bits.view(torch.float32)
    top = [0x7E00, -0x0200, 0x7C01, 0x7E35] if dtype == torch.float16 else [0x7FC0, -0x0040, 0x7F81, 0x7FC5]
    return torch.tensor(top, dtype=torch.int16).view(dtype)


def tricky_scores(n, dtype, g):
    """Scores with ties (few distinct values), ±0.0, ±inf and NaNs of several kinds."""
    x = torch.randint(-3, 4, (n,), generator=g).to(dtype) / 2
    x[torch.rand(n, generator=g) < 0.2] = 0.0
    x[torch.rand(n, generator=g) < 0.2] = -0.0
    x[torch.rand(n, generator=g) < 0.05] = float("inf")
    x[torch.rand(n, generator=g) < 0.05] = float("-inf")
    at = torch.randperm(n, generator=g)[: min(n, 8)]
    x[at] = nan_bits(dtype).repeat(2)[: len(at)]
    return x


def check_topk(scores, cu, keep, protect):
    got = t_topk.topk_select(scores, cu, keep, protect)
    kept, dropped, kept_cu, dropped_cu = got
    assert kept.dtype == dropped.dtype == torch.int64 and kept_cu.dtype == dropped_cu.dtype == cu.dtype
    for x, y in zip(got, reference.topk_select(scores, cu, keep, protect)):
        assert torch.equal(x, y), (keep, x, y)
    kept, dropped = naive_topk_select(*cpu(scores), (cu[1:] - cu[:-1]).tolist(), keep, *cpu(protect))
    assert (got[0].tolist(), got[1].tolist()) == (kept, dropped), keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_topk_select(dtype, cu_dtype):
    """Ragged images (one empty, one of a single row), keep 0 … all, with and without protected rows, strided
    scores and protect, ties, ±0.0 and NaNs."""
    g = torch.Generator().manual_seed(1)
    lengths = [7, 0, 1, 40, 13]
    n = sum(lengths)
    scores = torch.zeros(2 * n, dtype=dtype)
    scores[::2] = tricky_scores(n, dtype, g)
    scores = scores.to(DEVICE)[::2]  # strided
    protect = (torch.rand(3 * n, generator=g) < 0.3).to(DEVICE)[::3]
    cu = cu_seqlens(lengths, cu_dtype)
    free = [int((~protect[a:b]).sum()) for a, b in zip(cu.tolist(), cu.tolist()[1:])]
    for keeps in ([0, 0, 0, 0, 0], [3, 0, 1, 17, 5], lengths, [1, 0, 0, 39, 12]):
        check_topk(scores, cu, keeps, None)
        check_topk(scores, cu, [min(x, f) for x, f in zip(keeps, free)], protect)


def test_topk_select_long_image():
    """An image longer than one search block (the chunked threshold search), next to short ones."""
    g = torch.Generator().manual_seed(2)
    lengths = [3, 1500, 20]
    scores = tricky_scores(sum(lengths), torch.float32, g).to(DEVICE)
    protect = (torch.rand(sum(lengths), generator=g) < 0.1).to(DEVICE)
    cu = cu_seqlens(lengths, torch.int64)
    for keeps in ([1, 700, 10], [3, 1, 0]):
        check_topk(scores, cu, keeps, None)
        check_topk(scores, cu, keeps, protect)


def test_topk_select_signed_zero_and_nan_order():
    """−0.0 ties +0.0 (lower index first); NaNs of any sign or payload rank above +inf, by index."""
    s = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0], device=DEVICE)
    kept = t_topk.topk_select(s, cu_seqlens([5]), [3], None)[0]
    assert kept.tolist() == [0, 1, 2]
    nans = nan_bits(torch.float32)
    s = torch.tensor([float("inf"), 0.0, 0.0, 0.0, 5.0, 0.0], device=DEVICE)
    s[[5, 1, 3]] = nans[:3].to(DEVICE)
    for keep, want in ((1, [1]), (2, [1, 3]), (3, [1, 3, 5]), (4, [0, 1, 3, 5])):
        assert t_topk.topk_select(s, cu_seqlens([6]), [keep], None)[0].tolist() == want


# --------------------------------------------------------------------------------------------
# merge_nearest


def selection(lengths, keep, g, protect_rate=0.0):
    cu = cu_seqlens(lengths, torch.int64)
    n = sum(lengths)
    protect = (torch.rand(n, generator=g) < protect_rate).to(DEVICE) if protect_rate else None
    return reference.topk_select(torch.rand(n, generator=g).to(DEVICE), cu, keep, protect)


def check_merge(hidden, keys, sel, sizes):
    merged, size_out = t_merge.merge_nearest(hidden, keys, *sel, sizes)
    assert merged.dtype == hidden.dtype and size_out.dtype == torch.float32
    want = reference.merge_nearest(hidden, keys, *sel, sizes)
    torch.testing.assert_close(merged, want[0], **MERGED_TOL[hidden.dtype])
    torch.testing.assert_close(size_out, want[1], rtol=1e-6, atol=1e-6)
    kept, dropped, kept_cu, dropped_cu = (t.tolist() for t in cpu(*sel))
    oracle = naive_merge_nearest(*cpu(hidden, keys), [kept[a:b] for a, b in zip(kept_cu, kept_cu[1:])],
                                 [dropped[a:b] for a, b in zip(dropped_cu, dropped_cu[1:])], *cpu(sizes))
    torch.testing.assert_close(merged.double().cpu(), oracle[0].to(hidden.dtype).double(), **MERGED_TOL[hidden.dtype])
    torch.testing.assert_close(size_out.double().cpu(), oracle[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_nearest(dtype):
    """Ragged images (no rows; nothing dropped; more kept and dropped rows than one tile), strided hidden and
    keys (more key channels than one step, more hidden channels than one block), with and without sizes."""
    g = torch.Generator().manual_seed(4)
    lengths = [6, 0, 5, 90, 2, 40]
    keep = [2, 0, 5, 45, 1, 3]
    sel = selection(lengths, keep, g, protect_rate=0.1)
    n = sum(lengths)
    hidden = torch.randn(130, n, generator=g).to(dtype).to(DEVICE).T  # (T, C) column-major
    keys = torch.randn(n, 2 * 80, generator=g).to(dtype).to(DEVICE)[:, ::2]  # (T, Ck) strided
    sizes = (1 + 3 * torch.rand(n, generator=g)).to(DEVICE)
    for s in (None, sizes) if dtype != torch.float32 else (None, sizes.double()):
        check_merge(hidden, keys, sel, s)


def test_merge_nearest_similarity_ties():
    """Kept keys x and 2x (the same cosine, exactly): every dropped row goes to the lower kept position."""
    g = torch.Generator().manual_seed(5)
    n = 12
    keys = torch.randn(n, 8, generator=g).to(DEVICE)
    hidden = torch.randn(n, 3, generator=g).to(DEVICE)
    kept = torch.tensor([1, 4, 7], device=DEVICE)
    dropped = torch.tensor([i for i in range(n) if i not in (1, 4, 7)], device=DEVICE)
    cu_k, cu_d = torch.tensor([0, 3], device=DEVICE), torch.tensor([0, n - 3], device=DEVICE)
    keys[4] = 2 * keys[1]
    keys[7] = 0.5 * keys[1]
    merged, size_out = t_merge.merge_nearest(hidden, keys, kept, dropped, cu_k, cu_d, None)
    assert size_out.tolist() == [n - 2, 1, 1]
    want = reference.merge_nearest(hidden, keys, kept, dropped, cu_k, cu_d, None)
    torch.testing.assert_close(merged, want[0], **MERGED_TOL[torch.float32])
    torch.testing.assert_close(merged[0], hidden[[i for i in range(n) if i not in (4, 7)]].mean(0), rtol=1e-5,
                               atol=1e-6)
    # Dropped keys equal to their nearest kept key, and all-zero keys (cosine 0 everywhere: the first).
    keys = torch.randn(n, 8, generator=g).to(DEVICE)
    keys[0], keys[2], keys[3] = keys[7], 0.0, keys[4]
    keys[5] = 0.0
    check_merge(hidden, keys, (kept, dropped, cu_k, cu_d), None)
    # A tie between kept rows in different tiles of kept rows (positions 2 and 37 of 40): the lower wins.
    keys = torch.randn(50, 8, generator=g).to(DEVICE)
    hidden = torch.randn(50, 3, generator=g).to(DEVICE)
    kept, dropped = torch.arange(40, device=DEVICE), torch.arange(40, 50, device=DEVICE)
    keys[37] = 4 * keys[2]
    keys[40:45] = keys[2]
    keys[45:] = 0.25 * keys[37]
    cu_k, cu_d = torch.tensor([0, 40], device=DEVICE), torch.tensor([0, 10], device=DEVICE)
    size_out = t_merge.merge_nearest(hidden, keys, kept, dropped, cu_k, cu_d, None)[1]
    assert size_out[2] == 11 and size_out[37] == 1
    check_merge(hidden, keys, (kept, dropped, cu_k, cu_d), None)


def test_merge_nearest_nothing_dropped():
    g = torch.Generator().manual_seed(6)
    hidden, keys = torch.randn(9, 4, generator=g).to(DEVICE), torch.randn(9, 5, generator=g).to(DEVICE)
    sel = selection([4, 5], [4, 5], g)
    merged, size_out = t_merge.merge_nearest(hidden, keys, *sel, None)
    assert torch.equal(merged, hidden) and torch.equal(size_out, torch.ones(9, device=DEVICE))
    check_merge(hidden, keys, sel, torch.rand(9, generator=g).to(DEVICE) + 1)


# --------------------------------------------------------------------------------------------
# through torch.ops and the public wrappers


def test_backend_registered():
    assert all(name in ops.backends.BACKENDS["triton"].ops for name in OPS)
    assert "triton" in available_backends(DEVICE, op=OPS)
    for name in OPS:
        assert "triton" not in available_backends(DEVICE, dtype=torch.float64, op=name)
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(FlowCutInputError, match="does not take float64"):
        ops.attention_scores(q, q, scale=1.0, backend="triton")


def opcheck_args():
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 2, 8, generator=g).to(DEVICE), heads(2, 10, 2, 8, torch.float32, g)
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 7:] = False
    v = heads(2, 10, 2, 8, torch.float32, g)
    scores = torch.randn(12, generator=g).to(DEVICE)
    cu = cu_seqlens([5, 7])
    protect = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool, device=DEVICE)
    sel = reference.topk_select(scores, cu, [2, 1], protect)
    hidden, keys = torch.randn(12, 6, generator=g).to(DEVICE), torch.randn(12, 5, generator=g).to(DEVICE)
    return {
        "attention_scores": ("attention_scores", (q, k, 0.3, None, 0, 10)),
        "attention_scores-mask-span": ("attention_scores", (q, k, 0.3, mask, 2, 9)),
        "text_guided_scores": ("text_guided_scores", (q[:, :, 0], v[:, :, 0], k, v, [0, 1, 9, 1, 0, 10], 0.3)),
        "topk_select": ("topk_select", (scores, cu, [2, 1], None)),
        "topk_select-protect": ("topk_select", (scores, cu, [2, 1], protect)),
        "merge_nearest": ("merge_nearest", (hidden, keys, *sel, None)),
        "merge_nearest-sizes": ("merge_nearest", (hidden, keys, *sel, torch.rand(12, generator=g).to(DEVICE) + 1)),
    }


@pytest.mark.parametrize("case", list(opcheck_args()))
def test_opcheck(case):
    name, args = opcheck_args()[case]
    torch.library.opcheck(getattr(torch.ops.flowcut, "triton_" + name).default, args)


def test_public_wrappers():
    """Each public primitive with backend="triton" gives the reference backend's result."""
    g = torch.Generator().manual_seed(8)
    q, k = heads(2, 3, 4, 8, torch.bfloat16, g), heads(2, 12, 2, 8, torch.bfloat16, g)
    mask = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    mask[0, 10:] = False
    got, want = (ops.attention_scores(q, k, scale=0.35, key_mask=mask, span=(1, 11), backend=name)
                 for name in ("triton", "torch"))
    torch.testing.assert_close(got, want, **SCORE_TOL)
    v = heads(2, 12, 2, 8, torch.bfloat16, g)
    segments = [(1, 0, 12), (0, 2, 7)]
    got, want = (ops.text_guided_scores(q[:, :, 0], v[:, :, 0], k, v, segments, scale=0.35, backend=name)
                 for name in ("triton", "torch"))
    torch.testing.assert_close(got, want, **SCORE_TOL)
    # Dense scores with a span, then packed scores with protected rows; merge both ways.
    scores = torch.randn(2, 9, generator=g).half().to(DEVICE)
    hidden, keys = torch.randn(2, 9, 5, generator=g).to(DEVICE), torch.randn(2, 9, 4, generator=g).to(DEVICE)
    sels = [ops.topk_select(scores, 3, span=(1, 8), backend=name) for name in ("triton", "torch")]
    for field in ("kept", "dropped", "kept_cu", "dropped_cu", "mask"):
        assert torch.equal(getattr(sels[0], field), getattr(sels[1], field)), field
    sizes = torch.rand(2, 9, generator=g).to(DEVICE) + 1
    got, want = (ops.merge_nearest(hidden, keys, sels[0], sizes=sizes, backend=name) for name in ("triton", "torch"))
    assert got[0].shape == (2, 5, 5) and got[1].shape == (2, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cu = cu_seqlens([4, 0, 14])
    protect = torch.zeros(18, dtype=torch.bool, device=DEVICE)
    protect[[0, 5, 6]] = True
    keep = torch.tensor([2, 0, 3])
    sels = [ops.topk_select(scores.flatten(), keep, protect=protect, cu_seqlens=cu, backend=name)
            for name in ("triton", "torch")]
    for field in ("kept", "dropped", "kept_cu", "dropped_cu", "mask"):
        assert torch.equal(getattr(sels[0], field), getattr(sels[1], field)), field
    got, want = (ops.merge_nearest(hidden.flatten(0, 1), keys.flatten(0, 1), sels[0], backend=name)
                 for name in ("triton", "torch"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU only: compiled kernels at model-like shapes, torch.compile

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_shapes_cuda(dtype):
    """A LLaVA-like decoder layer (32 query heads on 8 key heads, 1200 tokens, 576 image tokens)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = heads(2, 6, 32, 128, dtype, g), heads(2, 1200, 8, 128, dtype, g), heads(2, 1200, 8, 128, dtype, g)
    got = ops.attention_scores(q, k, scale=128**-0.5, span=(35, 611), backend="triton")
    torch.testing.assert_close(got, reference.attention_scores(q, k, 128**-0.5, None, 35, 611), rtol=1e-3, atol=1e-6)
    segments = [(0, 35, 611), (1, 35, 611)]
    got = ops.text_guided_scores(q[:, :, -1], v[:, :, 0], k, v, segments, scale=128**-0.5, backend="triton")
    flat = [x for s in segments for x in s]
    want = reference.text_guided_scores(q[:, :, -1], v[:, :, 0], k, v, flat, 128**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    sel = ops.topk_select(got.view(2, -1).to(dtype), 64, backend="triton")
    ref = ops.topk_select(got.view(2, -1).to(dtype), 64, backend="torch")
    assert torch.equal(sel.kept, ref.kept) and torch.equal(sel.dropped, ref.dropped)
    hidden = torch.randn(2, 576, 4096, generator=g).to(dtype).to(DEVICE)
    merged = ops.merge_nearest(hidden, k[:, 0, 35:611], sel, backend="triton")
    want = ops.merge_nearest(hidden, k[:, 0, 35:611], sel, backend="torch")
    torch.testing.assert_close(merged, want, **MERGED_TOL[dtype])


@cuda_only
def test_torch_compile_fullgraph_cuda():
    g = torch.Generator().manual_seed(10)
    q, k = heads(1, 2, 8, 64, torch.float16, g), heads(1, 300, 2, 64, torch.float16, g)
    hidden = torch.randn(256, 512, generator=g).half().to(DEVICE)
    cu = cu_seqlens([100, 156])

    def step(q, k, hidden, cu):
        scores = torch.ops.flowcut.triton_attention_scores(q, k, 0.125, None, 44, 300)[0]
        sel = torch.ops.flowcut.triton_topk_select(scores, cu, [30, 40], None)
        return (scores, *sel, *torch.ops.flowcut.triton_merge_nearest(hidden, hidden, *sel, None))

    compiled = torch.compile(step, fullgraph=True)
    for x, y in zip(compiled(q, k, hidden, cu), step(q, k, hidden, cu)):
        torch.testing.assert_close(x, y)

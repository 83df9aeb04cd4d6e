"""The "native" backend's generic primitives (torch.ops.flowcut.native_attention_scores / native_text_guided_scores /
native_topk_select / native_merge_nearest: C++ CPU kernels, and the CUDA ones where a GPU is present) against the
reference (flowcut_kernels.ops.reference) and against the float64 oracle (tests/oracle/primitives.py), which shares
nothing with either."""

import pytest
import torch

from oracle.primitives import (
    naive_attention_scores, naive_merge_nearest, naive_text_guided_scores, naive_topk_select, nearest_kept,
)

from conftest import assert_same_bits_on_one_and_two_threads
from flowcut_kernels import available_backends, ops
from flowcut_kernels.ops import reference

_why = available_backends("cpu", reasons=True).get("native", "not registered")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"native backend unavailable: {_why}")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _devices():
    if _why is not None:
        return ["cpu"]
    from flowcut_kernels.ops import native

    return ["cpu"] + (["cuda"] if "cuda" in native.DEVICE_TYPES and torch.cuda.is_available() else [])


DEVICES = _devices()
OPS = torch.ops.flowcut


def relayout(x, kind):
    """x's values with other strides: "contiguous"; "transposed" (dims 1, 2 of a 4-D tensor, as Hugging Face's
    (B, S, H, D) storage; dims 0, 1 below); "strided" (every other element of a tensor twice as large in each dim)."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "transposed" and x.dim() >= 2:
        a, b = (1, 2) if x.dim() == 4 else (0, 1)
        return x.transpose(a, b).contiguous().transpose(a, b)
    big = torch.full([2 * n for n in x.shape], float("nan"), dtype=x.dtype, device=x.device)
    view = big[tuple(slice(None, None, 2) for _ in x.shape)]
    view.copy_(x)
    return view


def randn(*shape, scale=1.0, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def close(got, want, rtol, atol, what=""):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def score_tol(device, dtype):
    """(rtol, atol) of the float32 scores against the float64 oracle: the CPU kernels and float64 inputs accumulate in
    double (only the float32 output rounds); the CUDA ones accumulate other dtypes in float32."""
    if device == "cpu" or dtype == torch.float64:
        return 2e-6, 1e-9
    return 1e-4, 1e-7


# Against the reference, which computes in float32 for every dtype but float64.
def ref_tol(dtype):
    return (2e-6, 1e-9) if dtype == torch.float64 else (1e-4, 1e-7)


# --- the float64 oracle ----------------------------------------------------------------------------------------------


def cpu(*tensors):
    """The tensors on the CPU (None stays None), for the float64 oracle (tests/oracle/primitives.py)."""
    return [None if t is None else t.cpu() for t in tensors]


def oracle_attention_scores(q, k, scale, key_mask, start, end):
    return naive_attention_scores(*cpu(q, k), scale, *cpu(key_mask), (start, end))


def oracle_text_guided_scores(q_relay, v_relay, k, v, segments, scale):
    return naive_text_guided_scores(*cpu(q_relay, v_relay, k, v), list(zip(*[iter(segments)] * 3)), scale)


def groups(rows, cu):
    """Per image, the row indices of a packed selection's ``rows`` (offsets ``cu``)."""
    rows, cu = rows.tolist(), cu.tolist()
    return [rows[a:b] for a, b in zip(cu, cu[1:])]


# --- attention_scores -----------------------------------------------------------------------------------------------

# (B, Hq, Hkv, Q, S, D): GQA ratios 1, 2, 4 and 16 (more rows than the CPU kernel's 64-row tile), one query row
# and several.
ATTN_SHAPES = [
    (2, 4, 4, 1, 17, 8),
    (2, 8, 4, 3, 33, 16),
    (1, 8, 2, 5, 50, 32),
    (3, 4, 1, 1, 7, 64),
    (1, 16, 1, 5, 40, 8),
    (1, 1, 1, 1, 1, 1),
]


def attn_inputs(shape, dtype, layout, device, seed=0):
    B, Hq, Hkv, Q, S, D = shape
    q = relayout(randn(B, Hq, Q, D, scale=2.0, seed=seed, dtype=dtype, device=device), layout)
    k = relayout(randn(B, Hkv, S, D, scale=2.0, seed=seed + 1, dtype=dtype, device=device), layout)
    return q, k


def key_masks(B, S, device):
    """None, a padding mask (image b's last b + 1 keys padded, at least one key left), and a random one."""
    pad = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        pad[b, max(1, S - b - 1) :] = False
    rand = torch.rand(B, S, generator=torch.Generator().manual_seed(5)) > 0.4
    rand[:, 0] = True
    return [None, pad.to(device), rand.to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_scores(shape, dtype, layout, device):
    B, _, _, _, S, D = shape
    q, k = attn_inputs(shape, dtype, layout, device, seed=S)
    scale = D**-0.5
    spans = {(0, S), (S // 3, S - S // 4), (S - 1, S)}
    for mask in key_masks(B, S, device):
        for start, end in sorted(spans):
            got = OPS.native_attention_scores(q, k, scale, mask, start, end)
            assert got.dtype == torch.float32 and got.shape == (B, end - start) and got.is_contiguous()
            assert got.device.type == device
            what = f"mask={mask is not None} span={start, end}"
            close(got, oracle_attention_scores(q, k, scale, mask, start, end), *score_tol(device, dtype), what)
            close(got, reference.attention_scores(q, k, scale, mask, start, end), *ref_tol(dtype), what)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_scores_mixed_dtypes_and_sharp_logits(device):
    # q in float32, k in bfloat16 (each read in its own dtype); large logits (a near one-hot softmax) and a padded key
    # in the span.
    q = randn(2, 4, 3, 16, scale=6.0, seed=1, device=device)
    k = randn(2, 2, 30, 16, scale=6.0, seed=2, dtype=torch.bfloat16, device=device)
    mask = torch.ones(2, 30, dtype=torch.bool, device=device)
    mask[1, 10] = False
    got = OPS.native_attention_scores(q, k, 0.25, mask, 5, 20)
    close(got, oracle_attention_scores(q, k, 0.25, mask, 5, 20), *score_tol(device, torch.bfloat16))
    close(got, reference.attention_scores(q, k, 0.25, mask, 5, 20), *ref_tol(torch.bfloat16))
    assert got[1, 5].item() == 0.0  # the padded key gets nothing
    # The columns of the full span sum to 1 per image (every row's softmax sums to 1).
    full = OPS.native_attention_scores(q, k, 0.25, mask, 0, 30)
    close(full.sum(1), torch.ones(2), 1e-5, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_scores_public_wrapper(device):
    q, k = attn_inputs((2, 8, 2, 4, 24, 16), torch.float32, "transposed", device)
    mask = key_masks(2, 24, device)[1]
    got = ops.attention_scores(q, k, scale=0.25, key_mask=mask, span=(3, 19), backend="native")
    want = ops.attention_scores(q, k, scale=0.25, key_mask=mask, span=(3, 19), backend="torch")
    close(got, want, *ref_tol(torch.float32))
    close(ops.attention_scores(q, k, scale=0.25, backend="native"), oracle_attention_scores(q, k, 0.25, None, 0, 24),
          *score_tol(device, torch.float32))


# --- text_guided_scores ---------------------------------------------------------------------------------------------

# (B, Hq, Hkv, S, D) and segments (b, start, end): GQA ratios 1, 2, 4; several segments per sequence, one of a
# single token, overlapping ones.
TEXT_CASES = [
    ((2, 4, 4, 20, 8), [0, 2, 10, 1, 0, 20, 0, 5, 6]),
    ((2, 8, 4, 33, 16), [1, 3, 30, 0, 0, 33]),
    ((1, 8, 2, 50, 32), [0, 10, 40, 0, 0, 12, 0, 49, 50]),
    ((3, 4, 1, 12, 64), [2, 0, 12, 0, 4, 9, 1, 1, 2]),
    ((1, 1, 1, 1, 1), [0, 0, 1]),
]


def text_inputs(shape, dtype, layout, device, seed=0):
    B, Hq, Hkv, S, D = shape
    q_relay = relayout(randn(B, Hq, D, scale=2.0, seed=seed, dtype=dtype, device=device), layout)
    v_relay = relayout(randn(B, Hkv, D, seed=seed + 1, dtype=dtype, device=device), layout)
    k = relayout(randn(B, Hkv, S, D, scale=2.0, seed=seed + 2, dtype=dtype, device=device), layout)
    v = relayout(randn(B, Hkv, S, D, seed=seed + 3, dtype=dtype, device=device), layout)
    return q_relay, v_relay, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_text_guided_scores(case, dtype, layout, device):
    shape, segments = case
    q_relay, v_relay, k, v = text_inputs(shape, dtype, layout, device, seed=shape[3])
    scale = shape[-1] ** -0.5
    got = OPS.native_text_guided_scores(q_relay, v_relay, k, v, segments, scale)
    n = sum(segments[2::3]) - sum(segments[1::3])
    assert got.dtype == torch.float32 and got.shape == (n,) and got.is_contiguous() and got.device.type == device
    close(got, oracle_text_guided_scores(q_relay, v_relay, k, v, segments, scale), *score_tol(device, dtype))
    close(got, reference.text_guided_scores(q_relay, v_relay, k, v, segments, scale), *ref_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_text_guided_scores_edges(device):
    q_relay, v_relay, k, v = text_inputs((2, 4, 2, 16, 8), torch.float32, "contiguous", device)
    # No segment, and empty segments among others (the op takes them; the public wrapper asks for start < end).
    assert OPS.native_text_guided_scores(q_relay, v_relay, k, v, [], 0.3).shape == (0,)
    segments = [0, 3, 3, 1, 2, 9, 0, 16, 16, 0, 0, 4]
    got = OPS.native_text_guided_scores(q_relay, v_relay, k, v, segments, 0.3)
    close(got, oracle_text_guided_scores(q_relay, v_relay, k, v, segments, 0.3), *score_tol(device, torch.float32))
    close(got, reference.text_guided_scores(q_relay, v_relay, k, v, segments, 0.3), *ref_tol(torch.float32))
    # Mixed dtypes: each input read in its own.
    mixed = (q_relay.half(), v_relay.double(), k.bfloat16(), v)
    got = OPS.native_text_guided_scores(*mixed, segments, 0.3)
    close(got, oracle_text_guided_scores(*mixed, segments, 0.3), *score_tol(device, torch.bfloat16))
    close(got, reference.text_guided_scores(*mixed, segments, 0.3), *ref_tol(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_text_guided_scores_public_wrapper(device):
    q_relay, v_relay, k, v = text_inputs((2, 8, 2, 30, 16), torch.bfloat16, "transposed", device)
    segments = [(0, 4, 20), (1, 0, 30), (1, 10, 11)]
    got = ops.text_guided_scores(q_relay, v_relay, k, v, segments, scale=0.25, backend="native")
    want = ops.text_guided_scores(q_relay, v_relay, k, v, segments, scale=0.25, backend="torch")
    close(got, want, *ref_tol(torch.bfloat16))


# --- topk_select ----------------------------------------------------------------------------------------------------


def tricky_scores(n, seed, dtype):
    """Scores with many exact ties, NaN (both signs), +-inf and +-0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n,), generator=g).double() / 2
    pick = torch.rand(n, generator=g)
    x[pick < 0.08] = float("nan")
    x[(pick >= 0.08) & (pick < 0.12)] = -float("nan")
    x[(pick >= 0.12) & (pick < 0.16)] = 0.0
    x[(pick >= 0.16) & (pick < 0.20)] = -0.0
    x[(pick >= 0.20) & (pick < 0.22)] = float("inf")
    x[(pick >= 0.22) & (pick < 0.24)] = -float("inf")
    return x.to(dtype)


def check_topk(scores, cu, keep, protect):
    got = OPS.native_topk_select(scores, cu, keep, protect)
    want = reference.topk_select(scores, cu, keep, protect)
    kept, dropped = naive_topk_select(*cpu(scores), cu.diff().tolist(), keep, *cpu(protect))
    for name, x, y in zip(("kept", "dropped", "kept_cu", "dropped_cu"), got, want):
        assert x.dtype == y.dtype and x.device == scores.device, name
        assert torch.equal(x.cpu(), y.cpu()), (name, keep)
    assert (got[0].tolist(), got[1].tolist()) == (kept, dropped), keep
    assert got[2].dtype == cu.dtype and got[0].dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_select(dtype, cu_dtype, device):
    lens = [9, 0, 1, 40, 17, 600]  # an empty image, one of a single row, one longer than a CUDA block
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=cu_dtype, device=device)
    total = sum(lens)
    for seed in range(4):
        scores = tricky_scores(total, seed, dtype).to(device)
        if seed % 2:
            scores = relayout(scores, "strided")
        g = torch.Generator().manual_seed(100 + seed)
        protect = None if seed == 0 else (torch.rand(total, generator=g) < 0.25).to(device)
        free = [n if protect is None else int((~protect[a : a + n]).sum()) for a, n in zip(cu.tolist(), lens)]
        for keep in ([0] * len(lens), free, [min(f, 1) for f in free], [f // 2 for f in free],
                     [int(x) for x in torch.randint(0, 10**6, (len(lens),), generator=g) % (torch.tensor(free) + 1)]):
            check_topk(scores, cu, keep, protect)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_select_rules(device):
    # NaN above +inf, NaNs by lower index whatever their sign; -0.0 == 0.0 (lower index first); ties by lower index.
    nan = float("nan")
    scores = torch.tensor([0.0, -nan, 1.0, nan, float("inf"), -0.0, 1.0, 0.0, -1.0], device=device)
    cu = torch.tensor([0, 9], device=device)
    order = [1, 3, 4, 2, 6, 0, 5, 7, 8]  # the ranking
    for keep in range(10):
        kept, dropped, kept_cu, dropped_cu = OPS.native_topk_select(scores, cu, [keep], None)
        assert kept.tolist() == sorted(order[:keep]) and dropped.tolist() == sorted(order[keep:])
        assert kept_cu.tolist() == [0, keep] and dropped_cu.tolist() == [0, 9 - keep]
    protect = torch.tensor([False, False, True, False, False, True, False, False, True], device=device)
    kept, dropped, _, _ = OPS.native_topk_select(scores, cu, [3], protect)
    assert kept.tolist() == [1, 2, 3, 4, 5, 8] and dropped.tolist() == [0, 6, 7]
    # float16 / bfloat16 values are compared exactly: 1 + 2^-10 > 1 in float16.
    half = torch.tensor([1.0, 1.0 + 2**-10, 1.0], dtype=torch.float16, device=device)
    assert OPS.native_topk_select(half, torch.tensor([0, 3], device=device), [1], None)[0].tolist() == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_select_public_wrapper(device):
    scores = tricky_scores(3 * 20, 7, torch.float32).to(device)
    protect = (torch.rand(60, generator=torch.Generator().manual_seed(3)) < 0.3).to(device)
    cu = torch.tensor([0, 20, 31, 60], device=device)
    for kw in ({}, {"protect": protect}):
        free = [20, 11, 29] if not kw else [int((~protect[a:b]).sum()) for a, b in ((0, 20), (20, 31), (31, 60))]
        keep = [f // 2 for f in free]
        got = ops.topk_select(scores, keep, cu_seqlens=cu, backend="native", **kw)
        want = ops.topk_select(scores, keep, cu_seqlens=cu, backend="torch", **kw)
        for name in ("kept", "dropped", "kept_cu", "dropped_cu", "mask"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    # Dense scores with a span: the rows outside compete not.
    dense = tricky_scores(3 * 16, 8, torch.bfloat16).view(3, 16).to(device)
    got = ops.topk_select(dense, 5, span=(2, 14), backend="native")
    want = ops.topk_select(dense, 5, span=(2, 14), backend="torch")
    assert torch.equal(got.kept, want.kept) and torch.equal(got.dropped, want.dropped)


def test_topk_select_checks():
    scores, cu = torch.rand(10), torch.tensor([0, 4, 10])
    protect = torch.zeros(10, dtype=torch.bool)
    protect[:3] = True
    with pytest.raises(RuntimeError, match=r"keep\[0\]=2 exceeds the 1 unprotected rows of image 0"):
        OPS.native_topk_select(scores, cu, [2, 1], protect)
    with pytest.raises(RuntimeError, match=r"keep\[1\]=7 exceeds the 6 unprotected rows of image 1"):
        OPS.native_topk_select(scores, cu, [1, 7], None)
    with pytest.raises(RuntimeError, match=r"keep\[0\]=-1 must be >= 0"):
        OPS.native_topk_select(scores, cu, [-1, 1], None)
    with pytest.raises(RuntimeError, match="keep must hold one count per image"):
        OPS.native_topk_select(scores, cu, [1], None)
    with pytest.raises(RuntimeError, match="cu_seqlens must not decrease"):
        OPS.native_topk_select(scores, torch.tensor([0, 5, 4, 10]), [0, 0, 0], None)
    with pytest.raises(RuntimeError, match="cu_seqlens must end at the row count 10"):
        OPS.native_topk_select(scores, torch.tensor([0, 4, 9]), [0, 0], None)
    with pytest.raises(RuntimeError, match="protect must be bool"):
        OPS.native_topk_select(scores, cu, [1, 1], protect.float())
    with pytest.raises(RuntimeError, match="scores must be float32/float16/bfloat16/float64"):
        OPS.native_topk_select(scores.int(), cu, [1, 1], None)


# --- merge_nearest --------------------------------------------------------------------------------------------------


def selection(lens, keep, protect_rate, seed, device):
    """cu_seqlens and a reference topk_select selection of random scores (images that drop rows keep one)."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(sum(lens), generator=g).to(device)
    protect = (torch.rand(sum(lens), generator=g) < protect_rate).to(device) if protect_rate else None
    return cu, reference.topk_select(scores, cu, keep, protect)


def merge_tol(dtype, device):
    """(rtol, atol) of merged rows in hidden's dtype against float64 (values of order 1): its rounding."""
    if dtype == torch.float64:
        return (1e-12, 1e-12) if device == "cpu" else (1e-10, 1e-10)
    eps = torch.finfo(dtype).eps
    return (eps, 4 * eps) if dtype != torch.float32 else (1e-5, 1e-5)


def tie_keys(T, Ck, seed):
    """Keys whose cosines are exact in any summation order (4 entries of +-1 or +-2 each: unit entries +-1/2), so
    ties are exact for every implementation; many rows tie."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.zeros(T, Ck, dtype=torch.float64)
    for t in range(T):
        cols = torch.randperm(Ck, generator=g)[:4]
        keys[t, cols] = (torch.randint(0, 2, (4,), generator=g) * 2 - 1).double()
    return keys * torch.randint(1, 3, (T, 1), generator=g).double()  # some rows doubled: the same direction


def check_merge(hidden, keys, sel, sizes, device, exact_targets=True):
    kept, dropped, kept_cu, dropped_cu = sel
    merged, sizes_out = OPS.native_merge_nearest(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes)
    assert merged.dtype == hidden.dtype and merged.shape == (kept.numel(), hidden.shape[1]) and merged.is_contiguous()
    assert sizes_out.dtype == torch.float32 and sizes_out.shape == (kept.numel(),)
    assert merged.device == hidden.device and sizes_out.device == hidden.device
    want, want_sizes = reference.merge_nearest(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes)
    oracle, oracle_sizes = naive_merge_nearest(*cpu(hidden, keys), groups(*cpu(kept, kept_cu)),
                                            groups(*cpu(dropped, dropped_cu)), *cpu(sizes))
    rtol, atol = merge_tol(hidden.dtype, device)
    close(merged, oracle, rtol, atol, "merged vs the oracle")
    close(merged, want, 2 * rtol, 2 * atol, "merged vs reference")
    close(sizes_out, oracle_sizes, 1e-6, 1e-6, "sizes")
    close(sizes_out, want_sizes, 1e-6, 1e-6, "sizes vs reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_nearest(dtype, layout, device):
    lens = [12, 0, 5, 30, 1]
    for seed, (keep, protect_rate) in enumerate(
        (([3, 0, 5, 7, 1], 0.0), ([1, 0, 1, 29, 1], 0.0), ([2, 0, 1, 4, 1], 0.3), ([12, 0, 5, 30, 1], 0.0))
    ):
        _, sel = selection(lens, keep, protect_rate, seed, device)
        if any(k == 0 and d > 0 for k, d in zip(sel[2].diff().tolist(), sel[3].diff().tolist())):
            continue  # an image with dropped rows and nothing kept (protect_rate may leave one): not a merge
        T = sum(lens)
        hidden = relayout(randn(T, 24, seed=seed, dtype=dtype, device=device), layout)
        keys = relayout(randn(T, 8, seed=seed + 1, dtype=dtype, device=device), layout)
        sizes = relayout((torch.rand(T, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5).to(device), layout)
        for s in (None, sizes):
            check_merge(hidden, keys, sel, s, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_nearest_ties(dtype, device):
    # Exact cosine ties everywhere: the first kept row (in kept order) wins, in every implementation.
    lens = [40, 25]
    _, sel = selection(lens, [6, 4], 0.0, 3, device)
    keys = tie_keys(65, 8, 4).to(device)
    hidden = randn(65, 16, seed=5, dtype=dtype, device=device)
    sizes = torch.arange(1, 66, dtype=torch.float64, device=device) / 8
    kept = sel[0].tolist()
    targets = [lo + t for kept_b, dropped_b, lo in zip(groups(sel[0], sel[2]), groups(sel[1], sel[3]), sel[2].tolist())
               for t in nearest_kept(keys.cpu(), kept_b, dropped_b)]
    # The oracle breaks the ties as stated, and there were ties to break: dropped rows with several kept rows at their
    # best similarity.
    unit = torch.nn.functional.normalize(keys.double().cpu(), dim=-1)
    n_ties = 0
    for p, j in enumerate(sel[1].tolist()):
        b = 0 if j < 40 else 1
        lo, hi = sel[2][b].item(), sel[2][b + 1].item()
        image_sims = [float(unit[j] @ unit[kept[i]]) for i in range(lo, hi)]
        best = max(image_sims)
        n_ties += image_sims.count(best) > 1
        assert targets[p] == lo + image_sims.index(best)
    assert n_ties > 5
    for s in (None, sizes.to(dtype) if dtype != torch.bfloat16 else sizes.float()):
        check_merge(hidden, keys.to(dtype), sel, s, device)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_nearest_mixed_and_edges(device):
    cu, sel = selection([10, 7], [3, 2], 0.0, 9, device)
    hidden = randn(17, 5, seed=1, dtype=torch.float16, device=device)
    keys = randn(17, 9, seed=2, dtype=torch.float64, device=device)  # keys in their own dtype
    sizes = (torch.rand(17, generator=torch.Generator().manual_seed(1)) + 0.5).to(torch.bfloat16).to(device)
    check_merge(hidden, keys, sel, sizes, device)
    # Zero keys (normalised by max(|x|, 1e-12): similarity 0) and no channels.
    check_merge(hidden, torch.zeros_like(keys), sel, None, device)
    check_merge(hidden[:, :0], keys, sel, sizes, device)
    # Nothing dropped: each kept row is itself; nothing kept anywhere.
    all_kept = reference.topk_select(torch.rand(17, device=device), cu, [10, 7], None)
    merged, sizes_out = OPS.native_merge_nearest(hidden, keys, *all_kept, None)
    assert torch.equal(merged, hidden) and torch.equal(sizes_out, torch.ones(17, device=device))
    none = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(3, dtype=torch.long, device=device), torch.zeros(3, dtype=torch.long, device=device))
    merged, sizes_out = OPS.native_merge_nearest(hidden[:0], keys[:0], *none, None)
    assert merged.shape == (0, 5) and sizes_out.shape == (0,)


def test_merge_nearest_checks():
    hidden, keys = torch.randn(6, 4), torch.randn(6, 3)
    kept, dropped = torch.tensor([0, 3]), torch.tensor([1, 2, 4, 5])
    kc, dc = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 4])
    merge = OPS.native_merge_nearest
    with pytest.raises(RuntimeError, match="image 1 has dropped rows but keeps none"):
        merge(hidden, keys, kept, dropped, torch.tensor([0, 2, 2]), dc, None)
    with pytest.raises(RuntimeError, match=r"kept\[1\]=6 is out of range \[0, 6\)"):
        merge(hidden, keys, torch.tensor([0, 6]), dropped, kc, dc, None)
    with pytest.raises(RuntimeError, match=r"dropped\[0\]=-1 is out of range"):
        merge(hidden, keys, kept, torch.tensor([-1, 2, 4, 5]), kc, dc, None)
    with pytest.raises(RuntimeError, match="must end at the kept"):
        merge(hidden, keys, kept, dropped, kc, torch.tensor([0, 2, 3]), None)
    with pytest.raises(RuntimeError, match="must not decrease"):
        merge(hidden, keys, kept, dropped, kc, torch.tensor([0, 5, 4]), None)
    with pytest.raises(RuntimeError, match=r"keys must have shape \(T, Ck\) with T = 6"):
        merge(hidden, keys[:5], kept, dropped, kc, dc, None)
    with pytest.raises(RuntimeError, match="kept must be an int64"):
        merge(hidden, keys, kept.int(), dropped, kc, dc, None)
    with pytest.raises(RuntimeError, match=r"sizes must have shape \(T,\) = \(6,\)"):
        merge(hidden, keys, kept, dropped, kc, dc, torch.ones(5))
    with pytest.raises(RuntimeError, match="kept_cu and dropped_cu must both have shape"):
        merge(hidden, keys, kept, dropped, kc, dc[:2], None)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_nearest_public_wrapper(device):
    for dense in (False, True):
        if dense:
            scores = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)).to(device)
            hidden, keys = randn(3, 20, 12, seed=1, device=device), randn(3, 20, 6, seed=2, device=device)
            sizes = torch.rand(3, 20, generator=torch.Generator().manual_seed(3)).to(device) + 1
            sel = ops.topk_select(scores, 6, backend="native")
        else:
            cu = torch.tensor([0, 20, 27, 60], device=device)
            scores = torch.rand(60, generator=torch.Generator().manual_seed(0)).to(device)
            hidden, keys = randn(60, 12, seed=1, device=device), randn(60, 6, seed=2, device=device)
            sizes = torch.rand(60, generator=torch.Generator().manual_seed(3)).to(device) + 1
            sel = ops.topk_select(scores, [5, 3, 9], cu_seqlens=cu, backend="native")
        for s in (None, sizes):
            got = ops.merge_nearest(hidden, keys, sel, sizes=s, backend="native")
            want = ops.merge_nearest(hidden, keys, sel, sizes=s, backend="torch")
            close(got[0], want[0], 1e-5, 1e-5)
            close(got[1], want[1], 1e-6, 1e-6)


# --- opcheck, dispatch ----------------------------------------------------------------------------------------------


def test_backend_provides_the_primitives():
    from flowcut_kernels.ops.backends import BACKENDS

    for name in ("attention_scores", "text_guided_scores", "topk_select", "merge_nearest"):
        assert name in BACKENDS["native"].ops
        assert available_backends("cpu", op=name)[0] == "native"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, k = attn_inputs((2, 4, 2, 3, 12, 8), dtype, "transposed", device)
        for mask in (None, key_masks(2, 12, device)[1]):
            torch.library.opcheck(OPS.native_attention_scores.default, (q, k, 0.3, mask, 2, 10))
        q_relay, v_relay, k, v = text_inputs((2, 4, 2, 16, 8), dtype, "strided", device)
        torch.library.opcheck(OPS.native_text_guided_scores.default, (q_relay, v_relay, k, v, [0, 2, 9, 1, 0, 16], 0.3))
        scores = tricky_scores(30, 1, dtype).nan_to_num(2.0).to(device)  # opcheck's comparisons take NaN != NaN
        for cu_dtype in (torch.int32, torch.int64):
            cu = torch.tensor([0, 10, 10, 30], dtype=cu_dtype, device=device)
            torch.library.opcheck(OPS.native_topk_select.default, (scores, cu, [3, 0, 7], None))
            protect = (torch.arange(30, device=device) % 4) == 0
            # Protected rows make the kept count data-dependent (the fake's dynamic size).
            torch.library.opcheck(OPS.native_topk_select.default, (scores, cu, [3, 0, 7], protect))
        sel = reference.topk_select(scores.float(), torch.tensor([0, 10, 10, 30], device=device), [3, 0, 7], None)
        hidden, keys = randn(30, 6, dtype=dtype, device=device), randn(30, 5, seed=1, dtype=dtype, device=device)
        for sizes in (None, torch.rand(30, device=device) + 0.5):
            torch.library.opcheck(OPS.native_merge_nearest.default, (hidden, keys, *sel, sizes))


def test_cpu_results_do_not_depend_on_the_thread_count():
    q, k = attn_inputs((2, 16, 1, 5, 70, 8), torch.float32, "contiguous", "cpu")
    q_relay, v_relay, kt, vt = text_inputs((2, 8, 2, 40, 16), torch.float32, "contiguous", "cpu")
    _, sel = selection([30, 0, 41], [5, 0, 9], 0.2, 1, "cpu")
    hidden, keys = randn(71, 12, seed=1), randn(71, 6, seed=2)

    def run():
        return (
            OPS.native_attention_scores(q, k, 0.3, None, 3, 60),
            OPS.native_text_guided_scores(q_relay, v_relay, kt, vt, [0, 0, 40, 1, 5, 30], 0.25),
            *OPS.native_merge_nearest(hidden, keys, *sel, None),
        )

    assert_same_bits_on_one_and_two_threads(run)

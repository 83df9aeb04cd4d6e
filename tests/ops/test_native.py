"""The "native" backend (C++ CPU kernels of flowcut_kernels._C), dense and packed, against the reference and the naive
oracle."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flowcut_kernels
from conftest import assert_same_bits_on_one_and_two_threads
from flowcut_kernels import FlowCutInputError, available_backends, encode, ops, reference
from flowcut_kernels.bench.random_models import random_clip_vision, random_pixels
from flowcut_kernels.ops import backends
from oracle.flowcut import naive_flow_scores, naive_select_gather

_why = available_backends("cpu", reasons=True).get("native", "not registered")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"native backend unavailable: {_why}")

# Against the reference, which computes in float32 (float64 for float64 inputs): its value logits v_0.v_j, unscaled,
# reach ~|v|^2 = D, so its float32 rounding shows in exp at ~1e-5. The float64 oracle is the tight check.
TOL = {torch.float64: 1e-5, torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def qkv(b, h, s, d, dtype, layout, seed=0):
    """q_relay (B, H, D) and k, v (B, H, S, D) in a layout: "hf" (transposed (B, S, H, D)), "contiguous",
    or "strided" (every other element of a larger tensor, head dim not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, s, h, d, generator=g)).to(dtype)[:, 0]
    if layout == "hf":
        k = (2 * torch.randn(b, s, h, d, generator=g)).to(dtype).transpose(1, 2)
        v = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    elif layout == "contiguous":
        k = (2 * torch.randn(b, h, s, d, generator=g)).to(dtype)
        v = torch.randn(b, h, s, d, generator=g).to(dtype)
    else:
        k = (2 * torch.randn(b, h, s, 2 * d, generator=g)).to(dtype)[..., ::2]
        v = torch.randn(b, h, 2 * s, d, generator=g).to(dtype)[:, :, ::2]
    return q, k, v


def poison_allocator(numel):
    """Leave freed NaN-filled memory behind, so that outputs a kernel never writes show up as NaN."""
    junk = torch.full((numel,), float("nan"))
    del junk


def test_build_info():
    from flowcut_kernels import _C
    from flowcut_kernels.ops import native

    info = native.build_info()
    assert {key: info[key] for key in ("version", "with_cuda", "cuda_archs")} == _C.build_info()
    assert (info["cuda_skipped"] is None) == info["with_cuda"]
    assert info["version"] == _C.__version__ == flowcut_kernels.__version__
    assert info["with_cuda"] is _C.WITH_CUDA
    assert info["cuda_archs"] == list(_C.CUDA_ARCHS) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert bool(info["cuda_archs"]) == info["with_cuda"]
    assert native.DEVICE_TYPES == (("cpu", "cuda") if info["with_cuda"] else ("cpu",))
    assert ops.resolve_backend("auto", "cpu") == "native"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP flags are set for Linux builds")
def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for runs its body on one thread in an extension compiled without OpenMP (ATen inlines the
    parallel region): _C must call the OpenMP runtime (python/native_build.py adds -fopenmp)."""
    from flowcut_kernels import _C

    assert b"GOMP_parallel" in Path(_C.__file__).read_bytes()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["hf", "contiguous", "strided"])
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 17, 8), (1, 1, 2, 1), (3, 12, 50, 64)])
def test_flow_scores(dtype, layout, has_cls, semantic, with_prev, shape):
    b, h, s, d = shape
    q, k, v = qkv(b, h, s, d, dtype, layout, seed=s)
    n = s - has_cls
    prev = torch.rand(b, n, generator=torch.Generator().manual_seed(1)) if with_prev else None
    scale = d**-0.5
    poison_allocator(4 * b * n)
    got = ops.flow_scores(q, k, v, prev, scale=scale, has_cls=has_cls, semantic=semantic, backend="native")
    want = reference.flow_scores(q, k, v, prev, scale, has_cls, semantic)
    oracle = naive_flow_scores(q, k, v, prev, scale, has_cls, semantic)
    tol = TOL[dtype]
    for x, y, z in zip(got, want, oracle):
        assert x.dtype == torch.float32 and x.shape == y.shape and x.is_contiguous()
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * 1e-2)
        # The oracle reads the same rounded inputs in float64: close for every dtype.
        torch.testing.assert_close(x.double(), z, rtol=1e-5, atol=1e-7)


def test_flow_scores_q_of_another_dtype():
    q, k, v = qkv(2, 4, 17, 8, torch.bfloat16, "hf")
    q32 = q.float() + 1e-3  # not representable in bfloat16: the op must not round q to k's dtype
    got = ops.flow_scores(q32, k, v, scale=0.3, backend="native")
    want = reference.flow_scores(q32, k, v, None, 0.3, True, True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_float64_is_not_rounded_to_float32():
    """float64 k differing below float32 resolution: logits 1e8 * (1 + j * 1e-9) differ by 0.1 per token."""
    q = torch.full((1, 1, 1), 1e8, dtype=torch.float64)
    k = (1.0 + 1e-9 * torch.arange(6, dtype=torch.float64)).reshape(1, 1, 6, 1)
    v = torch.linspace(1.0, 2.0, 6, dtype=torch.float64).reshape(1, 1, 6, 1)
    assert torch.equal(k.float(), torch.ones_like(k.float()))  # rounded, every candidate would tie
    for has_cls in (True, False):
        got = ops.flow_scores(q, k, v, scale=1.0, has_cls=has_cls, semantic=False, backend="native")
        for x, z in zip(got, naive_flow_scores(q, k, v, None, 1.0, has_cls, False)):
            torch.testing.assert_close(x.double(), z, rtol=1e-6, atol=0.0)
        assert got[0][0].diff().gt(0).all()  # later tokens: larger logits, larger scores


def check_with_oracle(q, k, v, scale, has_cls, semantic, prev=None):
    """The native op's outputs: float32, finite, and equal to the float64 oracle's up to float32 rounding."""
    got = ops.flow_scores(q, k, v, prev, scale=scale, has_cls=has_cls, semantic=semantic, backend="native")
    oracle = naive_flow_scores(q, k, v, prev, scale, has_cls, semantic)
    for name, x, z in zip(("cum", "entropy", "attn"), got, oracle):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        torch.testing.assert_close(x.double(), z, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (False, True)])
def test_large_logits(dtype, has_cls, semantic):
    """q and k 30 times larger: logits in the thousands, whose exp overflows without the max subtracted."""
    q, k, v = qkv(2, 4, 33, 8, torch.float32, "hf", seed=5)
    q, k, v = (30 * q).to(dtype), (30 * k).to(dtype), v.to(dtype)
    assert (0.35 * torch.einsum("bhd,bhsd->bhs", q.double(), k.double())).abs().max() > 1000
    check_with_oracle(q, k, v, 0.35, has_cls, semantic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (True, False), (False, True)])
def test_large_norm_inputs(dtype, has_cls, semantic):
    """CLIP-L-sized heads with q, k ~ N(0, 9) and |v_h[j]| from 500 to 1000: the CLS row takes all of every
    head's value softmax (v_0.v_0 beats v_0.v_j by over 5e4), so the candidates' Sm underflows, also in double."""
    g = torch.Generator().manual_seed(7)
    b, h, s, d = 2, 16, 577, 64
    q = (3 * torch.randn(b, h, d, generator=g)).to(dtype)
    k = (3 * torch.randn(b, h, s, d, generator=g)).to(dtype)
    norms = 500 + 500 * torch.rand(b, h, s, 1, generator=g)
    v = (norms * torch.nn.functional.normalize(torch.randn(b, h, s, d, generator=g), dim=-1)).to(dtype)
    prev = torch.rand(b, s - has_cls, generator=g)
    cum, entropy, _ = check_with_oracle(q, k, v, d**-0.5, has_cls, semantic, prev)
    assert entropy.gt(0).all() and entropy.le(1).all()


@pytest.mark.parametrize("semantic", [True, False])
def test_one_hot_relay(semantic):
    """k_0 = 1000 q and v_0 100 times larger: every head puts all its softmax mass, relay and value, on the relay
    row (the candidates' logits ~1e4 lower: A = 0 even in double); the candidates' shares stay defined."""
    q, k, v = qkv(2, 4, 17, 8, torch.float32, "contiguous", seed=11)
    k[:, :, 0] = 1000 * q
    v[:, :, 0] *= 100
    cum, entropy, attn = check_with_oracle(q, k, v, 0.35, True, semantic)
    assert torch.equal(attn, torch.zeros_like(attn))
    assert cum.gt(0).all()


@pytest.mark.parametrize("has_cls", [True, False])
def test_all_equal_scores(has_cls):
    """A zero relay query and identical values: uniform attention, entropy 1 and equal scores."""
    q, k, v = qkv(2, 4, 17, 8, torch.float32, "contiguous", seed=13)
    q = torch.zeros_like(q)
    v = v[:, :, :1].expand_as(v)
    cum, entropy, attn = check_with_oracle(q, k, v, 0.35, has_cls, True)
    torch.testing.assert_close(entropy, torch.ones_like(entropy), rtol=0, atol=1e-6)
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 17), rtol=1e-6, atol=0)
    assert torch.equal(cum, cum[:, :1].expand_as(cum))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_whose_logits_overflow_float16(dtype):
    """Half-precision q, k, v whose dot products exceed float16's range (65504): accumulated wider."""
    q, k, v = qkv(2, 4, 17, 64, torch.float32, "hf", seed=17)
    q, k, v = (30 * q).to(dtype), (30 * k).to(dtype), (60 * v).to(dtype)
    assert torch.einsum("bhd,bhsd->bhs", v[:, :, 0].double(), v.double()).abs().max() > 65504
    assert torch.einsum("bhd,bhsd->bhs", q.double(), k.double()).abs().max() > 65504
    for has_cls in (True, False):
        check_with_oracle(q, k, v, 64**-0.5, has_cls, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_select_gather(dtype, has_cls, strided):
    b, s, c = 3, 40, 24
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, s, c, generator=g).to(dtype)
    n = s - has_cls
    cum = torch.rand(b, n, generator=g)
    cum[:, 1::3] = cum[:, :1]  # ties
    cum[0, 5], cum[1, 7], cum[1, 8], cum[2, 0] = 0.0, -0.0, 0.0, float("nan")  # -0.0 ties with 0.0; NaN first
    index_map = torch.randperm(1000, generator=g)[: b * n].reshape(b, n)
    if strided:  # hidden as a transposed view, cum and index_map as column slices
        hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)
        cum = torch.stack([cum, cum], dim=2)[..., 0]
        index_map = torch.stack([index_map, index_map], dim=2)[..., 1]
        assert not hidden.is_contiguous() and not cum.is_contiguous()
    for keep in (1, 2, 9, s - 1, s):
        poison_allocator(b * keep * c * 2)
        got = ops.select_gather(hidden, cum, index_map, keep, has_cls=has_cls, backend="native")
        want = reference.select_gather(hidden, cum, index_map, keep, has_cls)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), keep
        if not torch.isnan(cum).any():
            for x, z in zip(got, naive_select_gather(hidden, cum, index_map, keep, has_cls)):
                assert torch.equal(x, z)


def float32_from_bits(*bits):
    """float32 values of the given IEEE bit patterns (NaN signs and payloads as given)."""
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_nan_inf_and_signed_zero(has_cls):
    """NaN of any sign or payload ranks above every number (as torch.sort), NaNs and equal numbers by lower
    index, -0.0 ties +0.0; the kept scores are copied bit for bit."""
    specials = float32_from_bits(0x7FC00000, 0xFFC00000, 0x7FC00001, 0xFF800001, 0x7F800000, 0xFF800000,
                                 0x00000000, 0x80000000)  # NaN, -NaN, NaN payload, -NaN payload, ±inf, ±0.0
    g = torch.Generator().manual_seed(3)
    b, n, c = 4, 30, 6
    values = torch.cat([specials, specials, torch.tensor([1.0, 0.5, -2.0, 1.0, 0.5])])
    cum = values[torch.randint(len(values), (b, n), generator=g)]
    cum[0, : len(values)] = values[torch.randperm(len(values), generator=g)]  # each value at least once
    hidden = torch.randn(b, n + has_cls, c, generator=g)
    index_map = torch.randperm(100, generator=g)[:n].repeat(b, 1)
    for keep in range(1, n + has_cls + 1):
        got = ops.select_gather(hidden, cum, index_map, keep, has_cls=has_cls, backend="native")
        want = reference.select_gather(hidden, cum, index_map, keep, has_cls)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), keep
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32)), keep


def test_ties_keep_the_lower_index():
    hidden = torch.arange(2 * 9 * 2, dtype=torch.float32).reshape(2, 9, 2)
    cum = torch.full((2, 8), 0.5)
    cum[1, 6] = 0.75
    index_map = torch.arange(8).repeat(2, 1)
    out, kept_cum, kept = ops.select_gather(hidden, cum, index_map, 4, backend="native")
    assert kept.tolist() == [[0, 1, 2], [0, 1, 6]]
    assert kept_cum.tolist() == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.75]]
    assert torch.equal(out[1], hidden[1, [0, 1, 2, 7]])


def test_opcheck():
    op_scores = torch.ops.flowcut.native_flow_scores.default
    op_select = torch.ops.flowcut.native_select_gather.default
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, k, v = qkv(2, 4, 17, 8, dtype, "hf")
        for prev in (None, torch.rand(2, 16)):
            torch.library.opcheck(op_scores, (q, k, v, prev, 0.35, True, True))
        torch.library.opcheck(op_scores, (q, k, v, torch.rand(2, 17), 0.35, False, True))
        torch.library.opcheck(op_scores, (q, k, v, None, 0.35, True, False))
    hidden, cum, index_map = torch.randn(2, 17, 8), torch.rand(2, 16), torch.arange(16).repeat(2, 1)
    for keep in (1, 5, 17):
        torch.library.opcheck(op_select, (hidden, cum, index_map, keep, True))
    torch.library.opcheck(op_select, (hidden.half(), torch.rand(2, 17), torch.arange(17).repeat(2, 1), 4, False))


def test_direct_op_calls_check_their_inputs():
    hidden, cum, index_map = torch.randn(2, 17, 8), torch.rand(2, 16), torch.arange(16).repeat(2, 1)
    with pytest.raises(RuntimeError, match="keep=0 is out of range"):
        torch.ops.flowcut.native_select_gather(hidden, cum, index_map, 0, True)
    with pytest.raises(RuntimeError, match="cum must have shape"):
        torch.ops.flowcut.native_select_gather(hidden, cum[:, :3], index_map, 2, True)
    q, k, v = qkv(2, 4, 17, 8, torch.float32, "hf")
    with pytest.raises(RuntimeError, match="prev must have shape"):
        torch.ops.flowcut.native_flow_scores(q, k, v, torch.rand(2, 17), 1.0, True, True)
    with pytest.raises(RuntimeError, match="q_relay must have shape"):
        torch.ops.flowcut.native_flow_scores(q[:, :2], k, v, None, 1.0, True, True)


# --- Packed (varlen) batches -------------------------------------------------------------------------------


def offsets(lens, dtype=torch.int64):
    """cu_seqlens (B + 1,) of images of the given lengths."""
    return torch.tensor([0, *lens]).cumsum(0).to(dtype)


def packed_qkv(lens, h, d, dtype, layout, seed=0):
    """q_relay (B, H, D) and packed k, v (T, H, D) in a layout: "contiguous", "heads" ((H, T, D) memory,
    transposed) or "rows" (every other row of a wider tensor; v also every other element of the head dim)."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = (2 * torch.randn(len(lens), h, d, generator=g)).to(dtype)
    if layout == "contiguous":
        k = (2 * torch.randn(t, h, d, generator=g)).to(dtype)
        v = torch.randn(t, h, d, generator=g).to(dtype)
    elif layout == "heads":
        k = (2 * torch.randn(h, t, d, generator=g)).to(dtype).transpose(0, 1)
        v = torch.randn(h, t, d, generator=g).to(dtype).transpose(0, 1)
    else:
        k = (2 * torch.randn(2 * t, h, d, generator=g)).to(dtype)[::2]
        v = torch.randn(2 * t, h, 2 * d, generator=g).to(dtype)[::2, :, ::2]
    return q, k, v


def segments(lens, has_cls):
    """(rows, candidates) slices of each image of a packed batch."""
    row = cand = 0
    for s in lens:
        yield slice(row, row + s), slice(cand, cand + s - has_cls)
        row, cand = row + s, cand + s - has_cls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "heads", "rows"])
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("lens,h,d", [((5,), 4, 8), ((2, 17, 9), 4, 8), ((33, 1, 8, 2), 2, 16), ((50, 2, 64), 12, 64)])
def test_flow_scores_varlen(dtype, layout, has_cls, semantic, with_prev, lens, h, d):
    """Ragged images (S = 2 with CLS, S = 1 mean) in strided layouts: the reference, and per image the oracle."""
    lens = tuple(max(s, 1 + has_cls) for s in lens)
    q, k, v = packed_qkv(lens, h, d, dtype, layout, seed=sum(lens))
    cu = offsets(lens, torch.int32 if with_prev else torch.int64)  # both offset dtypes
    n = sum(lens) - len(lens) * has_cls
    prev = torch.rand(n, generator=torch.Generator().manual_seed(1)) if with_prev else None
    scale = d**-0.5
    poison_allocator(4 * n)
    got = ops.flow_scores_varlen(q, k, v, cu, prev, scale=scale, has_cls=has_cls, semantic=semantic, backend="native")
    want = reference.flow_scores_varlen(q, k, v, cu, prev, scale, has_cls, semantic)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and x.shape == y.shape and x.is_contiguous()
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=TOL[dtype], atol=TOL[dtype] * 1e-2)
    for b, (rows, cand) in enumerate(segments(lens, has_cls)):
        kb, vb = (x[rows].transpose(0, 1)[None] for x in (k, v))
        pb = None if prev is None else prev[cand][None]
        oracle = naive_flow_scores(q[b : b + 1], kb, vb, pb, scale, has_cls, semantic)
        for x, z in zip((got[0][cand], got[1][b : b + 1], got[2][cand]), oracle):
            torch.testing.assert_close(x.double(), z.flatten(), rtol=1e-5, atol=1e-7)


def test_flow_scores_varlen_one_hot_relay():
    """An image whose relay takes all of every head's mass (A = 0), packed next to ordinary ones: its shares stay
    defined and its neighbours are unaffected."""
    lens = (9, 17, 5)
    q, k, v = packed_qkv(lens, 4, 8, torch.float32, "contiguous", seed=11)
    k[9] = 1000 * q[1]  # image 1's relay row
    v[9] *= 100
    cu = offsets(lens)
    cum, entropy, attn = ops.flow_scores_varlen(q, k, v, cu, scale=0.35, backend="native")
    assert torch.equal(attn[8:24], torch.zeros(16)) and cum.gt(0).all() and torch.isfinite(entropy).all()
    for b, (rows, cand) in enumerate(segments(lens, True)):
        oracle = naive_flow_scores(q[b : b + 1], k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None], None,
                                   0.35, True, True)
        for x, z in zip((cum[cand], entropy[b : b + 1], attn[cand]), oracle):
            torch.testing.assert_close(x.double(), z.flatten(), rtol=1e-5, atol=1e-7)


def scores_with_ties(n, seed):
    """n float32 scores of few levels (ties), with -0.0 and +0.0, and one NaN."""
    g = torch.Generator().manual_seed(seed)
    cum = (torch.rand(n, generator=g) * 4).floor() / 4
    cum[torch.randperm(n, generator=g)[:4]] = torch.tensor([0.0, -0.0, 0.0, float("nan")])
    return cum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_select_gather_varlen(dtype, has_cls, strided):
    """Each image its own length (S = 2 with CLS, S = 1 mean) and keep, from 1 to all; ties and a NaN."""
    lens = (40, 1 + has_cls, 17, 9)
    n = sum(lens) - len(lens) * has_cls
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(sum(lens), 24, generator=g).to(dtype)
    cum = scores_with_ties(n, seed=1)
    index_map = torch.randperm(1000, generator=g)[:n]
    cu = offsets(lens, torch.int32 if strided else torch.int64)
    if strided:  # hidden as a transposed view, cum and index_map as every other element
        hidden = hidden.t().contiguous().t()
        cum, index_map = torch.stack([cum, cum], dim=1)[:, 0], torch.stack([index_map, index_map], dim=1)[:, 1]
        assert not hidden.is_contiguous() and not cum.is_contiguous()
    nan_free = [not cum[c].isnan().any() for _, c in segments(lens, has_cls)]
    for keep in ([1, 1, 1, 1], list(lens), [9, 1, 17, 2], [40, 1 + has_cls, 1, 5]):
        poison_allocator(sum(keep) * 24 * 2)
        got = ops.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls=has_cls, backend="native")
        want = reference.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), keep
        assert torch.equal(got[3], offsets(keep, cu.dtype))
        kept = 0
        for b, (rows, cand) in enumerate(segments(lens, has_cls)):
            k_b = keep[b] - has_cls
            if nan_free[b]:
                oracle = naive_select_gather(hidden[rows][None], cum[cand][None], index_map[cand][None], keep[b],
                                             has_cls)
                assert torch.equal(got[0][got[3][b] : got[3][b + 1]], oracle[0][0])
                assert torch.equal(got[1][kept : kept + k_b], oracle[1][0])
                assert torch.equal(got[2][kept : kept + k_b], oracle[2][0])
            kept += k_b


@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_varlen_nan_inf_and_signed_zero(has_cls):
    """The dense op's order (NaN above everything, equal numbers and NaNs by lower index, -0.0 == +0.0) within each
    image of a packed batch; the kept scores are copied bit for bit."""
    specials = float32_from_bits(0x7FC00000, 0xFFC00000, 0x7FC00001, 0xFF800001, 0x7F800000, 0xFF800000,
                                 0x00000000, 0x80000000)
    g = torch.Generator().manual_seed(5)
    lens = (30, 12, 1 + has_cls, 21)
    n = sum(lens) - len(lens) * has_cls
    values = torch.cat([specials, specials, torch.tensor([1.0, 0.5, -2.0, 1.0, 0.5])])
    cum = values[torch.randint(len(values), (n,), generator=g)]
    hidden = torch.randn(sum(lens), 6, generator=g)
    index_map = torch.randperm(200, generator=g)[:n]
    cu = offsets(lens)
    for step in range(1, max(lens) + 1):
        keep = [min(step, s) for s in lens]
        got = ops.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls=has_cls, backend="native")
        want = reference.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3]), keep
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32)), keep


def test_opcheck_varlen():
    op_scores = torch.ops.flowcut.native_flow_scores_varlen.default
    op_select = torch.ops.flowcut.native_select_gather_varlen.default
    lens = (5, 2, 9)
    for dtype, cu_dtype in ((torch.float32, torch.int32), (torch.bfloat16, torch.int64), (torch.float64, torch.int32)):
        q, k, v = packed_qkv(lens, 2, 4, dtype, "heads")
        cu = offsets(lens, cu_dtype)
        for prev in (None, torch.rand(13)):
            torch.library.opcheck(op_scores, (q, k, v, cu, prev, 0.5, True, True))
        torch.library.opcheck(op_scores, (q, k, v, cu, torch.rand(16), 0.5, False, True))
        torch.library.opcheck(op_scores, (q, k, v, cu, None, 0.5, True, False))
        hidden = torch.randn(16, 6, dtype=dtype, requires_grad=dtype == torch.float64)  # float64: with its gradient
        cum = scores_with_ties(16, 2).nan_to_num(2.0)  # opcheck's comparisons take NaN != NaN
        for keep in ([1, 1, 1], [3, 2, 9], [5, 1, 4]):
            torch.library.opcheck(op_select, (hidden, cum[:13], torch.arange(13), cu, keep, True))
        torch.library.opcheck(op_select, (hidden, cum, torch.arange(16), cu, [5, 1, 7], False))


@pytest.mark.parametrize("has_cls", [True, False])
def test_outputs_do_not_depend_on_the_thread_count(has_cls):
    """The CPU kernels' parallel tasks (64-row chunks, heads, images) combine in a fixed order: one thread and two
    give the same bits, dense and packed."""
    g = torch.Generator().manual_seed(7)
    q, k, v = qkv(3, 4, 300, 16, torch.float32, "hf", seed=3)
    n = 300 - has_cls
    prev, hidden = torch.rand(3, n, generator=g), torch.randn(3, 300, 24, generator=g)
    lens = (300, 130, 257)
    qp, kp, vp = packed_qkv(lens, 4, 16, torch.float32, "contiguous", seed=6)
    cu, tc = offsets(lens), sum(lens) - 3 * has_cls
    prev_p, hidden_p = torch.rand(tc, generator=g), torch.randn(sum(lens), 24, generator=g)
    flowcut_ops = torch.ops.flowcut

    def run():
        cum, entropy, attn = flowcut_ops.native_flow_scores(q, k, v, prev, 0.3, has_cls, True)
        out = flowcut_ops.native_select_gather(hidden, cum, torch.arange(n).repeat(3, 1), 77, has_cls)
        cum_p, entropy_p, attn_p = flowcut_ops.native_flow_scores_varlen(qp, kp, vp, cu, prev_p, 0.3, has_cls, True)
        out_p = flowcut_ops.native_select_gather_varlen(hidden_p, cum_p, torch.arange(tc), cu, [200, 9, 130],
                                                        has_cls)
        return cum, entropy, attn, *out, cum_p, entropy_p, attn_p, *out_p

    assert_same_bits_on_one_and_two_threads(run)


def test_direct_varlen_op_calls_check_their_inputs():
    lens = (5, 2, 9)
    q, k, v = packed_qkv(lens, 2, 4, torch.float32, "contiguous")
    cu, hidden, cum, index_map = offsets(lens), torch.randn(16, 6), torch.rand(13), torch.arange(13)
    scores, select = torch.ops.flowcut.native_flow_scores_varlen, torch.ops.flowcut.native_select_gather_varlen
    for bad, match in (
        (torch.tensor([1, 5, 7, 16]), "cu_seqlens must start at 0"),
        (torch.tensor([0, 5, 7, 15]), "cu_seqlens must end at the row count 16"),
        (torch.tensor([0, 5, 6, 16]), "cu_seqlens must increase by at least 2"),
        (torch.tensor([0, 7, 5, 16]), "cu_seqlens must increase by at least 2"),
        (cu.float(), "cu_seqlens must be int32 or int64"),
        (cu[None], r"cu_seqlens must have shape \(B \+ 1,\)"),
    ):
        with pytest.raises(RuntimeError, match=match):
            scores(q, k, v, bad, None, 1.0, True, True)
        with pytest.raises(RuntimeError, match=match):
            select(hidden, cum, index_map, bad, [1, 1, 1], True)
    with pytest.raises(RuntimeError, match=r"prev must have shape \(T_c,\) = \(13,\)"):
        scores(q, k, v, cu, torch.rand(16), 1.0, True, True)
    with pytest.raises(RuntimeError, match=r"q_relay must have shape \(B, H, D\) = \(3, 2, 4\)"):
        scores(q[:2], k, v, cu, None, 1.0, True, True)
    with pytest.raises(RuntimeError, match=r"k must have shape \(T, H, D\)"):
        scores(q, k[None], v, cu, None, 1.0, True, True)
    with pytest.raises(RuntimeError, match=r"keep\[1\]=3 is out of range \[1, S=2\]"):
        select(hidden, cum, index_map, cu, [1, 3, 1], True)
    with pytest.raises(RuntimeError, match=r"keep\[0\]=0 is out of range"):
        select(hidden, cum, index_map, cu, [0, 1, 1], True)
    with pytest.raises(RuntimeError, match="keep must hold one count per image"):
        select(hidden, cum, index_map, cu, [1, 1], True)
    with pytest.raises(RuntimeError, match=r"cum must have shape \(T_c,\) = \(16,\)"):
        select(hidden, cum, index_map, cu, [1, 1, 1], False)
    with pytest.raises(RuntimeError, match="index_map must be int64"):
        select(hidden, cum, index_map.int(), cu, [1, 1, 1], True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_layer,target", [(-1, 8), (-2, 30), (-4, 1)])
def test_encode_native_equals_torch(tiny_clip, dtype, feature_layer, target):
    model = random_clip_vision("tiny", seed=3, sharpen=8.0, dtype=dtype)
    pixels = random_pixels(model, 3, seed=3)
    with torch.no_grad():
        got = encode(model, pixels, target, feature_layer=feature_layer, backend="native")
        want = encode(model, pixels, target, feature_layer=feature_layer, backend="torch")
    assert got.tokens_per_layer == want.tokens_per_layer
    assert torch.equal(got.keep_indices, want.keep_indices)
    torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-5)


_PROBE = """
import json, sys, warnings
# An editable install's import hook would find the real _C: drop it.
sys.meta_path[:] = [m for m in sys.meta_path if "__editable__" not in getattr(m, "__module__", "")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import flowcut_kernels as f
    from flowcut_kernels.bench.kernels import measurable_backends
    from flowcut_kernels.ops import native
assert f.__file__.startswith(sys.argv[1]), f.__file__
try:
    native.build_info()
    build_info_error = None
except RuntimeError as error:
    build_info_error = str(error)
print(json.dumps({
    "reason": f.available_backends("cpu", reasons=True)["native"],
    "bench_skipped": measurable_backends("cpu")[1].get("native"),
    "auto": f.ops.resolve_backend("auto", "cpu"),
    "build_info_error": build_info_error,
    "warnings": [str(w.message) for w in caught if "native" in str(w.message)],
}))
"""


def probe_without_extension(tmp_path, c_module=None, status=None, **env):
    """Import a copy of the package without _C (or with ``c_module`` as _C.py) and without the build's record (or
    with ``status`` as the record) in a fresh interpreter."""
    package = Path(flowcut_kernels.__file__).parent
    shutil.copytree(package, tmp_path / "flowcut_kernels",
                    ignore=shutil.ignore_patterns("_C*", "_build_status.json", "__pycache__"))
    if c_module is not None:
        (tmp_path / "flowcut_kernels" / "_C.py").write_text(c_module)
    if status is not None:
        (tmp_path / "flowcut_kernels" / "_build_status.json").write_text(json.dumps(status))
    env = {k: v for k, v in os.environ.items() if k != "FLOWCUT_BUILD_NATIVE"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_missing_extension_is_a_reason_not_an_import_error(tmp_path):
    """Without _C the package imports, "native" is unavailable with a plain reason that says how to build it
    (in available_backends, the benchmark's skipped line and build_info's error), and one warning says so."""
    got = probe_without_extension(tmp_path)
    reason = got["reason"]
    assert reason.startswith("the compiled extension flowcut_kernels._C is not built (this install skipped it); "
                             "build it with `pip install --no-build-isolation -e .`"), reason
    assert "circular import" not in reason and "partially initialized" not in reason
    assert got["bench_skipped"] == got["build_info_error"] == reason
    assert got["auto"] == "torch"
    assert len(got["warnings"]) == 1 and reason in got["warnings"][0]


def test_missing_extension_is_quiet_when_skipped_on_purpose(tmp_path):
    got = probe_without_extension(tmp_path, FLOWCUT_BUILD_NATIVE="0")
    assert "is not built" in got["reason"] and got["warnings"] == []


def test_extension_that_does_not_load_keeps_its_reason(tmp_path):
    got = probe_without_extension(tmp_path, c_module='raise ImportError("undefined symbol: _ZN3foo3barEv")\n')
    reason = got["reason"]
    assert reason.startswith("the compiled extension flowcut_kernels._C does not load (undefined symbol: "
                             "_ZN3foo3barEv); rebuild it with `pip install --no-build-isolation -e .`"), reason
    assert got["build_info_error"] == reason and len(got["warnings"]) == 1


def test_failed_build_is_the_reason(tmp_path):
    """A build that failed (auto mode: the package installs without _C) recorded why; that is the reason given."""
    failed = "its build failed (RuntimeError: Error compiling objects for extension; `pip install -v` shows the " \
             "compiler's errors)"
    got = probe_without_extension(tmp_path, status={"native": failed, "cuda": "torch 2.14.1 has no CUDA"})
    assert got["reason"].startswith(f"the compiled extension flowcut_kernels._C is not built ({failed}); build it "
                                    "with `pip install --no-build-isolation -e .`"), got["reason"]
    assert got["build_info_error"] == got["reason"] and len(got["warnings"]) == 1


def test_first_cuda_use_warns_once_when_cuda_kernels_are_missing(monkeypatch):
    """A _C without CUDA kernels (recorded with mark_missing_device, as native.py does): the first op on a CUDA
    device (each op resolves its backend first) warns once with the reason; CPU ops do not."""
    reason = "CUDA_HOME=/nowhere is not a CUDA toolkit; build them with `pip install --no-build-isolation -e .`"
    monkeypatch.setattr(backends, "MISSING_DEVICES", {})
    monkeypatch.setattr(backends, "_WARNED", set())
    backends.mark_missing_device("native", "cuda", reason)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.resolve_backend("auto", "cpu") == "native"
        assert caught == []
        for _ in range(3):
            assert ops.resolve_backend("auto", "cuda") != "native"
    assert [str(w.message) for w in caught] == [f"flowcut_kernels: the 'native' backend has no CUDA kernels: {reason}"]
    assert available_backends("cuda", reasons=True)["native"] == f"has no CUDA kernels: {reason}"
    with pytest.raises(FlowCutInputError, match=re.escape(f"backend='native' is not available on cuda (has no CUDA "
                                                          f"kernels: {reason})")):
        ops.resolve_backend("native", "cuda")


_CUDA_PROBE = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import flowcut_kernels as f
    from flowcut_kernels.ops import native
    assert not caught, [str(w.message) for w in caught]
    f.ops.resolve_backend("auto", "cuda")
    f.ops.resolve_backend("auto", "cuda", op="topk_select")
print(native.build_info()["cuda_skipped"])
print("\\n".join(str(w.message) for w in caught))
"""


@pytest.mark.skipif(ops.native.build_info()["with_cuda"] if _why is None else False, reason="_C has CUDA kernels")
def test_extension_built_without_cuda_warns_on_first_cuda_use():
    """The installed _C, built without CUDA kernels: its recorded reason and the rebuild command, once, in a fresh
    interpreter."""
    out = subprocess.run([sys.executable, "-c", _CUDA_PROBE], capture_output=True, text=True, check=True).stdout
    skipped, message = out.strip().split("\n")
    assert message == (f"flowcut_kernels: the 'native' backend has no CUDA kernels: {skipped}; build them with "
                       "`FLOWCUT_BUILD_NATIVE=1 pip install -v --no-build-isolation -e .`, which stops at what fails "
                       "instead of leaving them out")

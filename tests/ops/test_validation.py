"""Input checks of issue 21: NaN entropies, nonsensical scales, mismatched relay dtypes, and bad input to the torch
(reference) and Triton ops called directly — each a FlowCutInputError whose message names the argument."""

import math

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import ops
from flowcut_kernels.checks import FlowCutInputError

OPS = torch.ops.flowcut
HAS_TRITON = "triton" in CPU_BACKENDS
HAS_NATIVE = "native" in CPU_BACKENDS
BAD_SCALES = [0.0, 0, -0.125, math.nan, math.inf, -math.inf]


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def dense(dtype=torch.float32):
    """q_relay (2, 4, 8), k, v (2, 4, 17, 8)."""
    return randn(2, 4, 8, seed=1, dtype=dtype), randn(2, 4, 17, 8, seed=2, dtype=dtype), randn(2, 4, 17, 8, seed=3,
                                                                                              dtype=dtype)


def packed(dtype=torch.float32):
    """q_relay (3, 4, 8), k, v (20, 4, 8) in images of 5, 9 and 6 rows."""
    cu = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
    return randn(3, 4, 8, seed=4, dtype=dtype), randn(20, 4, 8, seed=5, dtype=dtype), randn(20, 4, 8, seed=6,
                                                                                           dtype=dtype), cu


def text(dtype=torch.float32):
    """q_relay (2, 4, 8), v_relay (2, 2, 8), k, v (2, 2, 12, 8): GQA with 2 query heads per key head."""
    return (randn(2, 4, 8, seed=7, dtype=dtype), randn(2, 2, 8, seed=8, dtype=dtype),
            randn(2, 2, 12, 8, seed=9, dtype=dtype), randn(2, 2, 12, 8, seed=10, dtype=dtype))


def raises(match, fn, *args, **kwargs):
    with pytest.raises(FlowCutInputError, match=match):
        fn(*args, **kwargs)


# --- prune_count / prune_counts: a NaN or infinite Hn -----------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_prune_count_refuses_non_finite_entropy(bad):
    hn = torch.tensor([0.5, bad, 0.2])
    raises(r"entropy must be finite, got \[.*\] for image\(s\) \[1\]", ops.prune_count, hn, 100, 10, 2)
    raises("entropy must be finite", ops.prune_count, [0.3, bad], 100, 10, 2)
    raises(r"entropy must be finite.*image\(s\) \[1\]", ops.prune_counts, hn, [100, 90, 80], 10, 2)
    raises("entropy must be finite", OPS.prune_count, hn, 100, 10, 2)  # the op called directly
    raises("entropy must be finite", ops.prune_count, hn.half(), 100, 10, 2)
    # The last step (steps_left = 0) drops to the target whatever Hn is: it does not read it.
    assert ops.prune_count(hn, 100, 10, 0) == 91
    assert ops.prune_counts(hn, [100, 90, 80], 10, 0) == [91, 81, 71]
    # Finite values still work (and give the schedule rule's counts).
    assert ops.prune_count(torch.tensor([0.5, 0.0]), 100, 10, 4) == round(91 / 2)
    assert ops.prune_counts(torch.tensor([0.0, 1.0]), [100, 100], 10, 4) == [round(91 / 2), 0]


# --- scale: finite and > 0 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", BAD_SCALES)
def test_public_functions_refuse_bad_scales(scale):
    q, k, v = dense()
    raises("scale=.* is not an attention scale: it must be a finite float > 0", ops.flow_scores, q, k, v,
           scale=scale)
    qp, kp, vp, cu = packed()
    raises("scale=.* is not an attention scale", ops.flow_scores_varlen, qp, kp, vp, cu, scale=scale)
    raises("scale=.* is not an attention scale", ops.attention_scores, k, k, scale=scale)
    q_t, v_t, kt, vt = text()
    raises("scale=.* is not an attention scale", ops.text_guided_scores, q_t, v_t, kt, vt, [(0, 2, 9)], scale=scale)


@pytest.mark.parametrize("scale", BAD_SCALES)
def test_ops_called_directly_refuse_bad_scales(scale):
    q, k, v = dense()
    qp, kp, vp, cu = packed()
    q_t, v_t, kt, vt = text()
    prefixes = [""] + ["triton_"] * HAS_TRITON
    for prefix in prefixes:
        raises("scale=.* is not an attention scale", getattr(OPS, prefix + "flow_scores"), q, k, v, None, scale,
               True, True)
        raises("scale=.* is not an attention scale", getattr(OPS, prefix + "flow_scores_varlen"), qp, kp, vp, cu, None,
               scale, True, True)
        raises("scale=.* is not an attention scale", getattr(OPS, prefix + "attention_scores"), k, k, scale, None, 0,
               17)
        raises("scale=.* is not an attention scale", getattr(OPS, prefix + "text_guided_scores"), q_t, v_t, kt, vt,
               [0, 2, 9], scale)
    if HAS_NATIVE:  # the C++ check (a RuntimeError)
        for name, args in (
            ("native_flow_scores", (q, k, v, None, scale, True, True)),
            ("native_flow_scores_varlen", (qp, kp, vp, cu, None, scale, True, True)),
            ("native_attention_scores", (k, k, scale, None, 0, 17)),
            ("native_text_guided_scores", (q_t, v_t, kt, vt, [0, 2, 9], scale)),
        ):
            with pytest.raises(RuntimeError, match="scale must be a finite positive float"):
                getattr(OPS, name)(*args)


def test_good_scales_are_taken():
    q, k, v = dense()
    for scale in (1, 0.125, 1e-6, 30.0):
        cum, hn, _ = ops.flow_scores(q, k, v, scale=scale, backend="torch")
        assert torch.isfinite(cum).all() and torch.isfinite(hn).all()


# --- relay dtypes ---------------------------------------------------------------------------------------------


def test_relay_dtype_mismatch_is_refused():
    q, k, v = dense()
    raises(r"q_relay has dtype float16 but k has float32: pass q_relay in k's dtype or in float32 "
           r"\(e.g. q_relay.to\(k.dtype\)\)", ops.flow_scores, q.half(), k, v, scale=0.3)
    raises("q_relay has dtype bfloat16 but k has float32", ops.flow_scores, q.bfloat16(), k, v, scale=0.3)
    raises("q_relay has dtype float64 but k has float32", ops.flow_scores, q.double(), k, v, scale=0.3)
    raises("q_relay has dtype bfloat16 but k has float16", ops.flow_scores, q.bfloat16(), k.half(), v.half(),
           scale=0.3)
    raises("q_relay has dtype float32 but k has float64", ops.flow_scores, q, k.double(), v.double(), scale=0.3)
    qp, kp, vp, cu = packed()
    raises("q_relay has dtype float16 but k has float32", ops.flow_scores_varlen, qp.half(), kp, vp, cu, scale=0.3)
    raises(r"k and v must have the same dtype, got float32 and float16 \(convert v with .to\(k.dtype\)\)",
           ops.flow_scores_varlen, qp, kp, vp.half(), cu, scale=0.3)
    raises("q has dtype float16 but k has float32", ops.attention_scores, k.half(), k, scale=0.3)
    q_t, v_t, kt, vt = text()
    segments = [(0, 2, 9)]
    raises("q_relay has dtype float16 but k has float32", ops.text_guided_scores, q_t.half(), v_t, kt, vt, segments,
           scale=0.3)
    raises("v_relay has dtype float16 but k has float32", ops.text_guided_scores, q_t, v_t.half(), kt, vt, segments,
           scale=0.3)
    raises("k and v must have the same dtype", ops.text_guided_scores, q_t, v_t, kt, vt.double(), segments, scale=0.3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_relay_with_half_keys_is_taken(backend):
    """The mean variant's relay is a float32 mean of half-precision queries (models/policy.py): it stays allowed,
    and gives the scores of the same relay rounded to k's dtype up to that rounding."""
    q, k, v = dense(torch.float16)
    q32 = k.float().mean(dim=2)
    got = ops.flow_scores(q32, k, v, scale=0.35, has_cls=False, backend=backend)
    want = ops.flow_scores(q32, k.float(), v.float(), scale=0.35, has_cls=False, backend="torch")
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    ops.attention_scores(q32[:, :, None], k, scale=0.35, backend=backend)


# --- the reference (and Triton) ops called directly -----------------------------------------------------------


def direct_prefixes():
    return [""] + ["triton_"] * HAS_TRITON


@pytest.mark.parametrize("prefix", direct_prefixes())
def test_flow_scores_ops_called_directly_name_the_argument(prefix):
    fs, fsv = getattr(OPS, prefix + "flow_scores"), getattr(OPS, prefix + "flow_scores_varlen")
    q, k, v = dense()
    raises(r"q_relay must have shape \(B, H, D\) = \(2, 4, 8\) to match k, got \(2, 2, 8\)", fs, q[:, :2], k, v, None,
           0.3, True, True)
    raises("k and v must have the same shape", fs, q, k, v[:, :, :5], None, 0.3, True, True)
    raises("k must have shape", fs, q, k[0], v[0], None, 0.3, True, True)
    raises("prev must have shape", fs, q, k, v, torch.rand(2, 17), 0.3, True, True)
    raises("prev has dtype", fs, q, k, v, torch.rand(2, 16).double(), 0.3, True, True)
    raises("q_relay has dtype float16 but k has float32", fs, q.half(), k, v, None, 0.3, True, True)
    raises("S >= 2", fs, q, k[:, :, :1], v[:, :, :1], None, 0.3, True, True)
    qp, kp, vp, cu = packed()
    raises(r"q_relay must have shape \(B, H, D\) = \(3, 4, 8\) for 3 images", fsv, qp[:2], kp, vp, cu, None, 0.3, True,
           True)
    raises("cu_seqlens has dtype", fsv, qp, kp, vp, cu.float(), None, 0.3, True, True)
    raises(r"prev must have shape \(T_c,\) = \(17,\)", fsv, qp, kp, vp, cu, torch.rand(20), 0.3, True, True)
    raises("q_relay has dtype float16 but k has float32", fsv, qp.half(), kp, vp, cu, None, 0.3, True, True)
    if not prefix:  # the reference reads cu_seqlens anyway, so it checks its values too (Triton never reads them)
        raises("cu_seqlens must end at the row count 20", fsv, qp, kp, vp, torch.tensor([0, 5, 14, 19]), None, 0.3,
               True, True)


@pytest.mark.parametrize("prefix", direct_prefixes())
def test_primitive_ops_called_directly_name_the_argument(prefix):
    att, tgs = getattr(OPS, prefix + "attention_scores"), getattr(OPS, prefix + "text_guided_scores")
    _, k, _ = dense()
    raises(r"q must have shape \(B, Hq, Q, D\) with B = 2, D = 8", att, k[..., :4], k, 0.3, None, 0, 17)
    raises("q's 3 query heads must be a multiple of k's 4 key heads", att, k[:, :3], k, 0.3, None, 0, 17)
    raises("key_mask must have shape", att, k, k, 0.3, torch.ones(2, 16, dtype=torch.bool), 0, 17)
    raises("span=.* must satisfy", att, k, k, 0.3, None, 3, 18)
    q_t, v_t, kt, vt = text()
    raises(r"v_relay must have shape \(2, 2, 8\)", tgs, q_t, v_t[:, :1], kt, vt, [0, 2, 9], 0.3)
    raises("q_relay must have shape", tgs, q_t[:, :3], v_t, kt, vt, [0, 2, 9], 0.3)
    raises("k and v must have the same shape", tgs, q_t, v_t, kt, vt[:, :, :5], [0, 2, 9], 0.3)
    raises(r"segments\[1\]=\(2, 0, 3\) must name a sequence b < 2", tgs, q_t, v_t, kt, vt, [0, 2, 9, 2, 0, 3], 0.3)
    raises("segments must hold", tgs, q_t, v_t, kt, vt, [0, 2], 0.3)


@pytest.mark.parametrize("prefix", direct_prefixes())
def test_select_gather_ops_called_directly_name_the_argument(prefix):
    sg = getattr(OPS, prefix + "select_gather")
    hidden, cum, index_map = randn(2, 17, 8), torch.rand(2, 16), torch.arange(16).repeat(2, 1)
    raises("cum must have shape", sg, hidden, cum[:, :5], index_map, 3, True)
    raises("index_map has dtype", sg, hidden, cum, index_map.int(), 3, True)
    raises("keep=18 is out of range", sg, hidden, cum, index_map, 18, True)
    if not prefix:
        cu = torch.tensor([0, 5, 17])
        sgv = OPS.select_gather_varlen
        raises(r"keep\[1\]=13 is out of range", sgv, hidden[0], cum[0, :15], torch.arange(15), cu, [2, 13], True)
        raises("keep must hold one count per image", sgv, hidden[0], cum[0, :15], torch.arange(15), cu, [2], True)
        raises(r"cum must have shape \(T_c,\) = \(15,\)", sgv, hidden[0], cum[0], torch.arange(16), cu, [2, 3], True)

"""The reference (flowcut_kernels.reference) against the naive per-formula oracle in oracle/flowcut.py."""

import math

import pytest
import torch

from flowcut_kernels import reference
from oracle.flowcut import naive_flow_scores, naive_prune_count, naive_select_gather

SHAPES = [(1, 1, 2, 4), (2, 4, 17, 8), (3, 2, 33, 16), (2, 16, 65, 64)]  # (B, H, S, D)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qkv(shape, dtype, seed, spread=2.0):
    """q_relay (B,H,D) and k, v (B,H,S,D) as strided views, the way HF hands them over."""
    b, h, s, d = shape
    g = torch.Generator().manual_seed(seed)
    q = (spread * torch.randn(b, s, h, d, generator=g)).to(dtype)
    k = (spread * torch.randn(b, s, h, d, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    return q[:, 0], k, v  # q[:, 0] is a (B,H,D) view with stride S·H·D over B


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("with_prev", [False, True])
def test_flow_scores_matches_oracle(shape, dtype, has_cls, semantic, with_prev):
    q, k, v = qkv(shape, dtype, seed=sum(shape) + 10 * DTYPES.index(dtype) + 100 * has_cls + 1000 * semantic)
    assert shape[1] == 1 or not (k.is_contiguous() or q.is_contiguous())
    b, _, s, _ = shape
    n = s - 1 if has_cls else s
    prev = torch.rand(b, n, generator=torch.Generator().manual_seed(1)) if with_prev else None
    scale = shape[-1] ** -0.5

    cum, hn, attn = reference.flow_scores(q, k, v, prev, scale, has_cls, semantic)
    want_cum, want_hn, want_attn = naive_flow_scores(q, k, v, prev, scale, has_cls, semantic)

    for got, want in ((cum, want_cum), (hn, want_hn), (attn, want_attn)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        # Same (rounded) inputs, float32 vs float64 arithmetic: float32 tolerance for every input dtype.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_flow_scores_mean_variant_ignores_semantic():
    q, k, v = qkv((2, 2, 9, 4), torch.float32, seed=3)
    with_sem = reference.flow_scores(q, k, v, None, 0.5, has_cls=False, semantic=True)
    without = reference.flow_scores(q, k, v, None, 0.5, has_cls=False, semantic=False)
    for a, b in zip(with_sem, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_entropy_bounds():
    """Uniform attention gives Hn = 1; a one-hot relay attention gives Hn = 0."""
    b, h, s, d = 2, 3, 10, 4
    k = torch.zeros(b, h, s, d)
    v = torch.randn(b, h, s, d)
    q = torch.randn(b, h, d)
    _, hn, attn = reference.flow_scores(q, k, v, None, 1.0, True, True)
    torch.testing.assert_close(hn, torch.ones(b))
    torch.testing.assert_close(attn, torch.full((b, s - 1), 1.0 / s))
    k[:, :, 4] = 100.0 * q  # every head looks at token 4 only
    _, hn, _ = reference.flow_scores(q, k, v, None, 1.0, True, True)
    torch.testing.assert_close(hn, torch.zeros(b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("b,s,c", [(1, 2, 3), (2, 17, 8), (3, 65, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_gather_matches_oracle(has_cls, b, s, c, dtype):
    g = torch.Generator().manual_seed(s * 7 + b)
    n = s - 1 if has_cls else s
    hidden = torch.randn(b, c, s, generator=g).to(dtype).transpose(1, 2)  # strided (B,S,C)
    cum = torch.rand(b, n, generator=g)
    cum[:, ::3] = 0.5  # plenty of ties
    index_map = torch.randperm(4 * n, generator=g)[:n].expand(b, n)
    for keep in sorted({1, (s + 1) // 2, s}):
        got = reference.select_gather(hidden, cum, index_map, keep, has_cls)
        want = naive_select_gather(hidden, cum, index_map, keep, has_cls)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)


def test_select_gather_ties_keep_lower_index_in_original_order():
    hidden = torch.arange(6.0).view(1, 6, 1)
    cum = torch.tensor([[0.1, 0.7, 0.7, 0.9, 0.7]])  # candidates 0..4 are rows 1..5
    index_map = torch.tensor([[10, 11, 12, 13, 14]])
    out, cum_out, idx = reference.select_gather(hidden, cum, index_map, 4, True)
    assert out.flatten().tolist() == [0.0, 2.0, 3.0, 4.0]  # relay, then candidates 1, 2, 3
    assert idx.tolist() == [[11, 12, 13]]
    assert cum_out.tolist() == [[pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.9)]]


@pytest.mark.parametrize("seed", range(20))
def test_prune_count_matches_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    hn = torch.rand(4, generator=g)
    n = int(torch.randint(70, 600, (1,), generator=g))
    target = int(torch.randint(2, 65, (1,), generator=g))
    for rpl in (0, 2, 4, 10, 20):
        assert reference.prune_count(hn, n, target, rpl) == naive_prune_count(hn, n, target, rpl)


def test_prune_count_rounds_half_to_even_and_takes_batch_max():
    # (N − (T−1)) / √4 · (1 − 0) = 9 / 2 = 4.5 → 4 (even); 15 / 2 = 7.5 → 8.
    assert reference.prune_count(torch.zeros(1), 9, 1, 4) == 4
    assert reference.prune_count(torch.zeros(1), 15, 1, 4) == 8
    # The image with the lowest entropy sets the count.
    hn = torch.tensor([0.9, 0.1, 0.5])
    assert reference.prune_count(hn, 200, 65, 9) == round(136 / 3 * (1 - 0.1**2))
    assert reference.prune_count(torch.tensor([0.3]), 576, 65, 0) == 576 - 64
    assert math.isclose(reference.prune_count(torch.ones(2), 576, 65, 4), 0)

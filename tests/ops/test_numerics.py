"""Extreme inputs through every backend: finite scores equal to the float64 oracle, the same kept tokens.

The relay (CLS) row can take almost all the softmax mass: large-norm values make the semantic logit
v_h[0]·v_h[0] dwarf every v_h[0]·v_h[j], and a relay query aligned with its own key does the same for the
attention. The normalised A / ΣA and Sm / ΣSm must then come from the candidates' own log-sum-exp, not
from underflowed softmax values (0 / 0 = NaN).
"""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import ops
from oracle.flowcut import naive_flow_scores

HALF_DTYPES = (torch.float16, torch.bfloat16)


def normal(*shape, std, seed):
    return std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def large_norm(b=1, h=16, s=577, d=64, std=3.0, seed=0):
    """q, k, v ~ N(0, std²): at std 3 the relay's semantic logit exceeds every candidate's by ~500."""
    q, k, v = (normal(b, s, h, d, std=std, seed=seed + i).float().transpose(1, 2) for i in range(3))
    return q[:, :, 0], k, v


def huge_values(b=2, h=4, s=65, d=16, seed=1):
    """|v| per head up to 1e3 (value logits ~1e6)."""
    q, k, v = large_norm(b, h, s, d, std=1.0, seed=seed)
    return q, k, v * torch.linspace(1.0, 1e3 / (d**0.5), h)[None, :, None, None]


def one_hot_relay(b=2, h=4, s=65, d=16, seed=2):
    """Every head's relay query is its own key × 50: the relay attends only to itself."""
    q, k, v = large_norm(b, h, s, d, std=1.0, seed=seed)
    k = k.clone()
    k[:, :, 0] = 50 * q
    return q, k, v


def all_equal(b=2, h=4, s=33, d=8):
    """Equal keys and values: every candidate scores the same, Hn = 1."""
    q = torch.ones(b, h, d)
    k = torch.ones(b, h, s, d)
    return q, k, k.clone()


CASES = {"large_norm": large_norm, "huge_values": huge_values, "one_hot_relay": one_hot_relay, "all_equal": all_equal}


def check_against_oracle(got, q, k, v, has_cls, semantic, scale):
    want = naive_flow_scores(q, k, v, None, scale, has_cls, semantic)
    for name, x, y in zip(("cum", "entropy", "attn"), got, want):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        top = y.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(x.double(), y, rtol=2e-4, atol=1e-6 * top.item(), msg=name)
    return want[0]


def check_kept(cum, want_cum, keep):
    """The kept sets agree wherever the oracle's keep-th and next scores are not (nearly) tied."""
    order = want_cum.sort(dim=-1, descending=True, stable=True)
    gap = order.values[:, keep - 1] - order.values[:, keep]
    clear = gap > 1e-4 * order.values[:, :1].squeeze(-1).abs()
    got = ops.select_gather(torch.zeros(*cum.shape, 1), cum, None, keep, has_cls=False, backend="torch")[2]
    want = order.indices[:, :keep].sort(dim=-1).values
    assert torch.equal(got[clear], want[clear])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (True, False), (False, True)])
def test_extreme_inputs(backend, case, has_cls, semantic):
    q, k, v = CASES[case]()
    if not has_cls:  # the mean variant's relay is the mean query
        q = q.clone() if case == "all_equal" else k.mean(dim=2) * 3
    scale = k.shape[-1] ** -0.5
    got = ops.flow_scores(q, k, v, scale=scale, has_cls=has_cls, semantic=semantic, backend=backend)
    want_cum = check_against_oracle(got, q, k, v, has_cls, semantic, scale)
    if case == "all_equal":
        torch.testing.assert_close(got[1], torch.ones_like(got[1]))
    check_kept(got[0], want_cum, keep=got[0].shape[1] // 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_whose_logits_overflow_half(backend, dtype):
    """fp16/bf16 q, k, v whose dot products (~1e5) exceed fp16's range: scores accumulate in float32."""
    q, k, v = (x.to(dtype) for x in large_norm(b=2, h=4, s=65, d=16, std=80.0, seed=5))
    assert torch.isinf((q.float()[:, :, None] * k.float()).sum(-1).half()).any()  # fp16 logits would overflow
    got = ops.flow_scores(q, k, v, scale=0.25, backend=backend)
    want_cum = check_against_oracle(got, q, k, v, True, True, 0.25)
    check_kept(got[0], want_cum, keep=20)


def near_one_hot(gap, has_cls, b=2, h=16, s=577, d=64, seed=7):
    """In every head one candidate's relay logit stands ``gap`` above the others (which are ~N(0, 1)): p is
    within ~1e-10 (gap 30) or ~1e-15 (gap 40) of one-hot, and Hn is that small too."""
    g = torch.Generator().manual_seed(seed)
    scale = d**-0.5
    q = torch.zeros(b, h, d, dtype=torch.float64)
    q[..., 0] = 1.0  # the logit of token j is scale · k[..., j, 0]
    k = torch.randn(b, h, s, d, generator=g, dtype=torch.float64) / scale
    top = torch.randint(int(has_cls), s, (b,), generator=g)  # the same candidate in every head
    k[torch.arange(b), :, top, 0] += gap / scale
    v = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    return q.float(), k.float(), v.float(), scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gap", [30.0, 40.0])
@pytest.mark.parametrize("has_cls", [True, False])
def test_entropy_of_near_one_hot_rows(backend, gap, has_cls):
    """Hn of a near-one-hot p to float32 accuracy: the largest p's −ln p is log1p(−(the others' mass)), not the log
    of a value that rounds to 1 (which lost its share of Hn: ~3% at gap 30 in float32, ~5% at gap 40 in double)."""
    q, k, v, scale = near_one_hot(gap, has_cls)
    _, hn, _ = ops.flow_scores(q, k, v, scale=scale, has_cls=has_cls, backend=backend)
    want = naive_flow_scores(q, k, v, None, scale, has_cls, True)[1]
    assert (want > 1e-16).all() and (want < 1e-8).all()  # tiny, yet a normal float32
    torch.testing.assert_close(hn.double(), want, rtol=2e-5, atol=0)

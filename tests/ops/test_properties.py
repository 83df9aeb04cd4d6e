"""Property tests: random batches (ragged or dense), shapes, strides, dtypes, variants, keep counts and ties,
every backend against the float64 oracle (tests/oracle/flowcut.py), image by image.

Hypothesis runs derandomized (the same examples every run, so CI is reproducible) and prints the failing
example; each (op, backend) pair draws its own examples — fewer, smaller ones under the Triton interpreter.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CPU_BACKENDS
from flowcut_kernels import ops
from oracle.flowcut import naive_flow_scores, naive_select_gather

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def examples(backend: str) -> int:
    return 12 if backend == "triton" else 60


def configured(backend: str):
    return settings(
        max_examples=examples(backend), derandomize=True, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def batches(draw, backend: str, ragged: bool):
    """A packed batch: per-image lengths, H, D, dtype, variant, value scale, tie level and layout."""
    has_cls = draw(st.booleans())
    longest = 24 if backend == "triton" else 70
    b = draw(st.integers(1, 4))
    if ragged:
        lens = draw(st.lists(st.integers(1 + has_cls, longest), min_size=b, max_size=b))
    else:
        lens = [draw(st.integers(1 + has_cls, longest))] * b
    dtypes = [n for n in DTYPES if not (backend == "triton" and n == "float64")]
    return dict(
        lens=lens,
        heads=draw(st.integers(1, 4)),
        dim=draw(st.sampled_from([1, 3, 8, 16])),
        dtype=DTYPES[draw(st.sampled_from(dtypes))],
        has_cls=has_cls,
        semantic=draw(st.booleans()),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        levels=draw(st.sampled_from([0, 2, 5])),  # 0: continuous values; else values on a few levels (ties)
        layout=draw(st.sampled_from(["contiguous", "heads_first", "sliced"])),
        with_prev=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def tensors(case):
    """q_relay (B, H, D); k, v (T, H, D) in the drawn layout; prev (T_c,) or None."""
    g = torch.Generator().manual_seed(case["seed"])
    total, h, d = sum(case["lens"]), case["heads"], case["dim"]

    def values(*shape):
        x = case["scale"] * torch.randn(*shape, generator=g, dtype=torch.float64)
        if case["levels"]:
            x = (x * case["levels"]).round() / case["levels"]
        return x.to(case["dtype"])

    def laid_out():
        if case["layout"] == "heads_first":  # (H, T, D) storage seen as (T, H, D)
            return values(h, total, d).transpose(0, 1)
        if case["layout"] == "sliced":  # every other row of a wider tensor, offset by one head
            return values(2 * total, h + 1, d)[::2, 1:]
        return values(total, h, d)

    k, v = laid_out(), laid_out()
    q = values(len(case["lens"]), h, d)
    n = total - len(case["lens"]) * case["has_cls"]
    prev = torch.rand(n, generator=g) if case["with_prev"] else None
    return q, k, v, prev


def cu(lens):
    return torch.tensor([0, *lens]).cumsum(0).to(torch.int32)


def segments(lens, has_cls):
    """(row start, rows, candidate start, candidates) of each image."""
    rows = candidates = 0
    for length in lens:
        yield rows, length, candidates, length - has_cls
        rows, candidates = rows + length, candidates + length - has_cls


def check_scores(backend, case):
    q, k, v, prev = tensors(case)
    scale = case["dim"] ** -0.5
    got = ops.flow_scores_varlen(q, k, v, cu(case["lens"]), prev, scale=scale, has_cls=case["has_cls"],
                                 semantic=case["semantic"], backend=backend)
    for b, (r, s, c, n) in enumerate(segments(case["lens"], case["has_cls"])):
        kb, vb = (x[r : r + s].transpose(0, 1)[None] for x in (k, v))
        pb = None if prev is None else prev[c : c + n][None]
        want = naive_flow_scores(q[b : b + 1], kb, vb, pb, scale, case["has_cls"], case["semantic"])
        for name, x, y in zip(("cum", "entropy", "attn"), got, want):
            part = x[b : b + 1] if name == "entropy" else x[c : c + n][None]
            assert part.dtype == torch.float32 and torch.isfinite(part).all(), (name, b)
            # Hn lies in [0, 1]: near 0 (one-hot attention) float32's absolute error is what counts.
            atol = 5e-6 if name == "entropy" else 1e-5 * y.abs().max().item() + 1e-7
            torch.testing.assert_close(part.double(), y, rtol=2e-3, atol=atol, msg=f"{name} {b}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ragged", [True, False])
def test_flow_scores_varlen(backend, ragged):
    @configured(backend)
    @given(batches(backend, ragged))
    def run(case):
        check_scores(backend, case)

    run()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flow_scores_dense_strided(backend):
    """The dense op on (B, H, S, D) views of the same draws (equal lengths): each image against the oracle."""

    @configured(backend)
    @given(batches(backend, ragged=False))
    def run(case):
        q, k, v, prev = tensors(case)
        b, s = len(case["lens"]), case["lens"][0]
        kd, vd = (x.unflatten(0, (b, s)).transpose(1, 2) for x in (k, v))  # (B, H, S, D) views
        pd = None if prev is None else prev.view(b, -1)
        scale = case["dim"] ** -0.5
        got = ops.flow_scores(q, kd, vd, pd, scale=scale, has_cls=case["has_cls"], semantic=case["semantic"],
                              backend=backend)
        want = naive_flow_scores(q, kd, vd, pd, scale, case["has_cls"], case["semantic"])
        for name, x, y in zip(("cum", "entropy", "attn"), got, want):
            assert torch.isfinite(x).all()
            atol = 5e-6 if name == "entropy" else 1e-5 * y.abs().max().item() + 1e-7
            torch.testing.assert_close(x.double(), y, rtol=2e-3, atol=atol, msg=name)

    run()


@st.composite
def selections(draw, backend: str):
    """A packed batch of hidden rows and candidate scores with ties, and a keep count per image."""
    has_cls = draw(st.booleans())
    longest = 40 if backend == "triton" else 300
    lens = draw(st.lists(st.integers(1 + has_cls, longest), min_size=1, max_size=4))
    keep = [draw(st.integers(1, s)) for s in lens]
    dtypes = [n for n in DTYPES if not (backend == "triton" and n == "float64")]
    return dict(
        lens=lens, keep=keep, has_cls=has_cls, channels=draw(st.integers(1, 20)),
        dtype=DTYPES[draw(st.sampled_from(dtypes))], levels=draw(st.sampled_from([0, 1, 3])),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_select_gather_varlen(backend):
    @configured(backend)
    @given(selections(backend))
    def run(case):
        g = torch.Generator().manual_seed(case["seed"])
        lens, has_cls = case["lens"], case["has_cls"]
        total, n = sum(lens), sum(lens) - len(lens) * has_cls
        hidden = torch.randn(total, 2 * case["channels"], generator=g).to(case["dtype"])
        if case["strided"]:
            hidden = hidden[:, ::2]
        else:
            hidden = hidden[:, : case["channels"]]
        cum = torch.rand(n, generator=g)
        if case["levels"]:  # heavy ties: 1 level = every score equal
            cum = (cum * case["levels"]).floor()
        index_map = torch.randperm(10 * n + 1, generator=g)[:n]
        out, cum_out, index_out, cu_out = ops.select_gather_varlen(
            hidden, cum, index_map, cu(lens), torch.tensor(case["keep"]), has_cls=has_cls, backend=backend
        )
        assert torch.equal(cu_out, cu(case["keep"]))
        kept = 0
        for b, (r, s, c, m) in enumerate(segments(lens, has_cls)):
            want = naive_select_gather(hidden[r : r + s][None], cum[c : c + m][None], index_map[c : c + m][None],
                                       case["keep"][b], has_cls)
            k = case["keep"][b]
            assert torch.equal(out[cu_out[b] : cu_out[b + 1]], want[0][0].to(out.dtype)), b
            assert torch.equal(cum_out[kept : kept + k - has_cls], want[1][0].float()), b
            assert torch.equal(index_out[kept : kept + k - has_cls], want[2][0]), b
            kept += k - has_cls

    run()


def test_enough_generated_cases_per_run():
    """The property tests above draw at least 200 cases per CI run across the ops."""
    per_backend = [4 * examples(b) for b in CPU_BACKENDS]  # 3 flow_scores tests + 1 select_gather test
    assert sum(per_backend) >= 200 and math.prod(per_backend) > 0

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
    """The property tests draw at least 200 cases per CI run across the ops."""
    per_backend = [5 * examples(b) for b in CPU_BACKENDS]  # 3 flow_scores, 1 select_gather, 1 primitives test
    assert sum(per_backend) >= 200 and math.prod(per_backend) > 0


# --- Generic primitives -----------------------------------------------------------------------------------


@st.composite
def primitive_cases(draw, backend: str):
    """Ragged lengths, heads (GQA ratios), dtype, tie level, layout and a seed for the primitives."""
    longest = 24 if backend == "triton" else 60
    lens = draw(st.lists(st.integers(1, longest), min_size=1, max_size=4))
    kv_heads = draw(st.sampled_from([1, 2]))
    dtypes = [n for n in DTYPES if not (backend == "triton" and n == "float64")]
    return dict(
        lens=lens, kv_heads=kv_heads, heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        rows=draw(st.integers(1, 3)), dim=draw(st.sampled_from([1, 4, 8])),
        dtype=DTYPES[draw(st.sampled_from(dtypes))], levels=draw(st.sampled_from([0, 1, 3])),
        strided=draw(st.booleans()), protect=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _values(case, *shape, g, strided=False):
    """Random values of the case's dtype and tie level; ``strided``: every other column of a wider tensor."""
    shape = (*shape[:-1], 2 * shape[-1]) if strided else shape
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if case["levels"]:
        x = (x * case["levels"]).round() / case["levels"]
    x = x.to(case["dtype"])
    return x[..., ::2] if strided else x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_primitives(backend):
    """attention_scores, topk_select and merge_nearest on random ragged cases against the float64 oracle."""
    from oracle.primitives import naive_attention_scores, naive_merge_nearest, naive_topk_select

    @configured(backend)
    @given(primitive_cases(backend))
    def run(case):
        g = torch.Generator().manual_seed(case["seed"])
        lens, total = case["lens"], sum(case["lens"])
        # attention_scores over a padded batch with a key mask: each image's keys, its own rows.
        width = max(lens)
        q = _values(case, len(lens), case["heads"], case["rows"], case["dim"], g=g)
        k = _values(case, len(lens), case["kv_heads"], width, case["dim"], g=g, strided=case["strided"])
        mask = torch.arange(width) < torch.tensor(lens)[:, None]
        got = ops.attention_scores(q, k, scale=0.5, key_mask=mask, backend=backend)
        want = naive_attention_scores(q, k, 0.5, mask)
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-6)
        # topk_select on packed scores with ties and protected rows, then merge_nearest of the same rows.
        scores = _values(case, total, g=g)
        protect = torch.rand(total, generator=g) < 0.3 if case["protect"] else None
        free = [n - (0 if protect is None else int(p.sum())) for n, p in
                zip(lens, (protect if protect is not None else torch.zeros(total, dtype=torch.bool)).split(lens))]
        keep = [int(torch.randint(min(1, f), f + 1, (), generator=g)) for f in free]  # 0 only with nothing free
        cu = torch.tensor([0, *lens]).cumsum(0)
        selection = ops.topk_select(scores, keep, protect=protect, cu_seqlens=cu, backend=backend)
        kept, dropped = naive_topk_select(scores, lens, keep, protect)
        assert selection.kept.tolist() == kept and selection.dropped.tolist() == dropped
        counts = (selection.kept_cu[1:] - selection.kept_cu[:-1]).tolist()
        if all(c > 0 for c in counts):
            hidden = _values(case, total, 6, g=g, strided=case["strided"])
            keys = torch.randn(total, 5, generator=g, dtype=torch.float64).to(case["dtype"])
            merged, sizes = ops.merge_nearest(hidden, keys, selection, backend=backend)
            cuts = selection.kept_cu.tolist(), selection.dropped_cu.tolist()
            groups = [selection.kept[a:b].tolist() for a, b in zip(cuts[0], cuts[0][1:])]
            drops = [selection.dropped[a:b].tolist() for a, b in zip(cuts[1], cuts[1][1:])]
            want, want_sizes = naive_merge_nearest(hidden, keys, groups, drops)
            low = case["dtype"] in (torch.float16, torch.bfloat16)
            torch.testing.assert_close(merged.double(), want, rtol=2e-2 if low else 1e-5, atol=2e-2 if low else 1e-5)
            assert torch.equal(sizes.double(), want_sizes)

    run()

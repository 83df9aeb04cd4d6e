"""Every op of the "native" backend (torch.ops.flowcut.native_*, called directly) with each tensor argument in
non-contiguous layouts — transposed, sliced (every other element of a larger tensor, NaN between) and expanded (a
stride-0 broadcast dim) — gives exactly the result of the same values contiguous; and direct calls with out-of-range
``keep``, bad segments or spans and mismatched shapes raise a RuntimeError that names the argument (the C++ checks in
csrc/ops.cpp, reached without the Python wrappers), never an out-of-bounds access."""
import pytest
import torch

from flowcut_kernels import available_backends

_why = available_backends("cpu", reasons=True).get("native", "not registered")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"native backend unavailable: {_why}")

OPS = torch.ops.flowcut
KINDS = ["transposed", "sliced", "expanded"]


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def broadcast(x):
    """x's first dim of size > 1 made a stride-0 broadcast of its first slice (the values every layout then holds)."""
    dim = next((d for d, n in enumerate(x.shape) if n > 1), None)
    return x if dim is None else x.narrow(dim, 0, 1).expand_as(x)


def relayout(x, kind):
    """The values of x (already broadcast for "expanded") with other strides."""
    if kind == "expanded":
        return x  # built by broadcast(): a stride-0 dim
    if kind == "transposed" and x.dim() >= 2:
        a, b = x.dim() - 2, x.dim() - 1
        return x.transpose(a, b).contiguous().transpose(a, b)
    fill = float("nan") if x.is_floating_point() else (True if x.dtype == torch.bool else -(2**40))
    big = torch.full([2 * n for n in x.shape], fill, dtype=x.dtype)
    view = big[tuple(slice(None, None, 2) for _ in x.shape)]
    view.copy_(x)
    return view


def assert_same(got, want, what):
    got, want = (got,) if isinstance(got, torch.Tensor) else got, (want,) if isinstance(want, torch.Tensor) else want
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i, g.shape, w.shape)
        assert torch.equal(g, w) or (g.is_floating_point() and torch.equal(g.isnan(), w.isnan())
                                     and torch.equal(g.nan_to_num(), w.nan_to_num())), (what, i, (g - w).abs().max())


# Each case: the op, its arguments (contiguous), and which of them may take other layouts ("expanded" only where a
# repeated value keeps the input valid: not offsets nor kept/dropped row lists).
def _cases():
    g = torch.Generator().manual_seed(1)
    B, H, S, D = 2, 4, 9, 8
    q, k, v = randn(B, H, D, seed=1, scale=2), randn(B, H, S, D, seed=2, scale=2), randn(B, H, S, D, seed=3)
    prev = torch.rand(B, S - 1, generator=g)
    hidden = randn(B, S, 6, seed=4)
    cum = torch.rand(B, S - 1, generator=g)
    index = torch.randperm(40, generator=g)[: 2 * (S - 1)].view(B, S - 1)
    lens = [5, 2, 9]
    T = sum(lens)
    cu = torch.tensor([0, *lens]).cumsum(0)
    qp, kp, vp = randn(3, H, D, seed=5, scale=2), randn(T, H, D, seed=6, scale=2), randn(T, H, D, seed=7)
    prev_p, cum_p = torch.rand(T - 3, generator=g), torch.rand(T - 3, generator=g)
    hidden_p, index_p = randn(T, 6, seed=8), torch.randperm(100, generator=g)[: T - 3]
    scores = randn(T, seed=9)
    protect = torch.zeros(T, dtype=torch.bool)
    protect[[1, 5, 7]] = True  # protect[0] False: expanded, no row is protected
    kept, dropped, kept_cu, dropped_cu = OPS.native_topk_select(scores, cu, [2, 0, 4], protect)
    return {
        "flow_scores": (OPS.native_flow_scores, [q, k, v, prev, 0.35, True, True], {0, 1, 2, 3}),
        "flow_scores_mean": (OPS.native_flow_scores, [q, k, v, torch.rand(B, S, generator=g), 0.35, False, False],
                             {0, 1, 2, 3}),
        "select_gather": (OPS.native_select_gather, [hidden, cum, index, 4, True], {0, 1, 2}),
        "flow_scores_varlen": (OPS.native_flow_scores_varlen, [qp, kp, vp, cu, prev_p, 0.35, True, True],
                               {0, 1, 2, 3, 4}),
        "select_gather_varlen": (OPS.native_select_gather_varlen, [hidden_p, cum_p, index_p, cu, [3, 1, 5], True],
                                 {0, 1, 2, 3}),
        "attention_scores": (OPS.native_attention_scores,
                             [randn(B, H, 3, D, seed=10, scale=2), randn(B, 2, S, D, seed=11, scale=2), 0.35,
                              torch.rand(B, S, generator=g) > 0.3, 1, 7], {0, 1, 3}),
        "text_guided_scores": (OPS.native_text_guided_scores,
                               [randn(B, H, D, seed=12, scale=2), randn(B, 2, D, seed=13), randn(B, 2, S, D, seed=14),
                                randn(B, 2, S, D, seed=15), [0, 1, 6, 1, 0, 9, 0, 6, 9], 0.35], {0, 1, 2, 3}),
        "topk_select": (OPS.native_topk_select, [scores, cu, [2, 0, 4], protect], {0, 1, 3}),
        "merge_nearest": (OPS.native_merge_nearest,
                          [randn(T, 6, seed=16), randn(T, 5, seed=17), kept, dropped, kept_cu, dropped_cu,
                           torch.rand(T, generator=g) + 0.5], {0, 1, 2, 3, 4, 5, 6}),
    }


CASES = _cases()
NO_EXPAND = {"flow_scores_varlen": {3}, "select_gather_varlen": {3}, "topk_select": {1},
             "merge_nearest": {2, 3, 4, 5}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_each_argument_in_another_layout_gives_the_contiguous_result(case, kind):
    op, args, tensors = CASES[case]
    expandable = tensors - NO_EXPAND.get(case, set())
    checked = 0
    for i in sorted(tensors if kind != "expanded" else expandable):
        base = list(args)
        if kind == "expanded":
            base[i] = broadcast(base[i])
        if kind == "transposed" and base[i].dim() < 2:
            continue
        want = op(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in base])
        given = list(base)
        given[i] = relayout(base[i], kind)
        assert not given[i].is_contiguous()
        assert_same(op(*given), want, f"{case}: argument {i} {kind}")
        checked += 1
    if not checked:
        assert kind == "transposed", case
        pytest.skip("every tensor argument is 1-D")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_every_argument_at_once_in_another_layout(case, kind):
    op, args, tensors = CASES[case]
    chosen = tensors - NO_EXPAND.get(case, set()) if kind == "expanded" else tensors
    base = [broadcast(a) if kind == "expanded" and i in chosen else a for i, a in enumerate(args)]
    want = op(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in base])
    given = [relayout(a, kind) if i in chosen and (kind != "transposed" or a.dim() >= 2) else a
             for i, a in enumerate(base)]
    assert_same(op(*given), want, f"{case}: all {kind}")


def test_prev_as_a_column_slice_and_a_transposed_view():
    """prev (B, N) as the running S_cum is handed on: a column slice of a wider tensor, the transpose of (N, B)."""
    op, args, _ = CASES["flow_scores"]
    prev = args[3]
    want = op(*args)
    wide = torch.cat([torch.full_like(prev, float("nan")), prev], 1)[:, prev.shape[1]:]
    assert_same(op(*args[:3], wide, *args[4:]), want, "prev column slice")
    assert_same(op(*args[:3], prev.T.contiguous().T, *args[4:]), want, "prev transposed")


# --- direct calls with bad arguments --------------------------------------------------------------


def test_dense_ops_refuse_out_of_range_keep_and_mismatched_shapes():
    q, k, v, prev = CASES["flow_scores"][1][:4]
    hidden, cum, index = CASES["select_gather"][1][:3]
    S = hidden.shape[1]
    select, scores = OPS.native_select_gather, OPS.native_flow_scores
    for keep in (S + 1, 2**40, 0, -1):
        with pytest.raises(RuntimeError, match=rf"keep={keep} is out of range \[1, S={S}\]"):
            select(hidden, cum, index, keep, True)
    with pytest.raises(RuntimeError, match=rf"keep={S + 1} is out of range"):
        select(hidden, torch.rand(2, S), torch.arange(S).repeat(2, 1), S + 1, False)
    assert select(hidden, cum, index, S, True)[0].shape == hidden.shape  # the bound itself is allowed
    for bad, match in (
        ((hidden[:1], cum, index), "cum must have shape"),
        ((hidden, cum, index[:, :-1]), "index_map must have the shape of cum"),
        ((hidden, cum.double(), index), "cum must be float32"),
        ((hidden[0], cum, index), r"hidden must have shape \(B, S, C\)"),
    ):
        with pytest.raises(RuntimeError, match=match):
            select(*bad, 2, True)
    for bad, match in (
        ((q, k, v[:, :, :-1], prev), "v must have the shape of k"),
        ((q, k[..., :-1], v[..., :-1], prev), "q_relay must have shape"),
        ((q, k, v, prev[:, :-1]), "prev must have shape"),
        ((q, k, v, prev.double()), "prev must be float32"),
        ((q, k[0], v[0], prev), r"k must have shape \(B, H, S, D\)"),
        ((q, k[:, :, :1], v[:, :, :1], None), "no candidate left"),
    ):
        with pytest.raises(RuntimeError, match=match):
            scores(*bad, 1.0, True, True)


def test_primitives_refuse_out_of_range_segments_spans_and_mismatched_shapes():
    q, k, scale, mask = CASES["attention_scores"][1][:4]
    S = k.shape[2]
    attention = OPS.native_attention_scores
    for start, end in ((0, S + 1), (-1, 3), (5, 4)):
        with pytest.raises(RuntimeError, match=rf"the span \[{start}, {end}\)"):
            attention(q, k, scale, mask, start, end)
    with pytest.raises(RuntimeError, match="key_mask must have shape"):
        attention(q, k, scale, mask[:, :-1], 0, S)
    with pytest.raises(RuntimeError, match="key_mask must be bool"):
        attention(q, k, scale, mask.float(), 0, S)
    with pytest.raises(RuntimeError, match="q's 4 query heads must be a positive multiple of k's 3"):
        attention(q, k[:, :1].expand(-1, 3, -1, -1), scale, mask, 0, S)
    with pytest.raises(RuntimeError, match="q must have shape"):
        attention(q[..., :-1], k, scale, mask, 0, S)

    qr, vr, kk, vv, segments, scale = CASES["text_guided_scores"][1]
    guided = OPS.native_text_guided_scores
    for bad in ([0, 1, S + 1], [2, 0, 3], [0, -1, 3], [0, 5, 4], [0, 1]):
        with pytest.raises(RuntimeError, match="segment"):
            guided(qr, vr, kk, vv, bad, scale)
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        guided(qr, vr, kk, vv[:, :, :-1], segments, scale)
    with pytest.raises(RuntimeError, match="v_relay must have shape"):
        guided(qr, vr[:, :1], kk, vv, segments, scale)
    with pytest.raises(RuntimeError, match="q_relay must have shape"):
        guided(qr[..., :-1], vr, kk, vv, segments, scale)

    scores, cu, keep, protect = CASES["topk_select"][1]
    with pytest.raises(RuntimeError, match=r"keep\[2\]=9 exceeds the 8 unprotected rows of image 2"):
        OPS.native_topk_select(scores, cu, [2, 0, 9], protect)
    with pytest.raises(RuntimeError, match="protect must have shape"):
        OPS.native_topk_select(scores, cu, keep, protect[:-1])
    with pytest.raises(RuntimeError, match="cu_seqlens must end at the row count"):
        OPS.native_topk_select(scores[:-1], cu, keep, None)

    hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes = CASES["merge_nearest"][1]
    merge = OPS.native_merge_nearest
    T = hidden.shape[0]
    with pytest.raises(RuntimeError, match=rf"kept\[0\]={T} is out of range \[0, {T}\)"):
        merge(hidden, keys, torch.cat([kept.new_tensor([T]), kept[1:]]), dropped, kept_cu, dropped_cu, sizes)
    with pytest.raises(RuntimeError, match=rf"dropped\[0\]={2**40} is out of range"):
        merge(hidden, keys, kept, torch.cat([dropped.new_tensor([2**40]), dropped[1:]]), kept_cu, dropped_cu, sizes)
    with pytest.raises(RuntimeError, match="keys must have shape"):
        merge(hidden, keys[:-1], kept, dropped, kept_cu, dropped_cu, sizes)
    with pytest.raises(RuntimeError, match="sizes must have shape"):
        merge(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes[:-1])


def test_varlen_ops_refuse_out_of_range_keep_and_mismatched_shapes():
    qp, kp, vp, cu, prev = CASES["flow_scores_varlen"][1][:5]
    hidden, cum, index = CASES["select_gather_varlen"][1][:3]
    select, scores = OPS.native_select_gather_varlen, OPS.native_flow_scores_varlen
    with pytest.raises(RuntimeError, match=r"keep\[2\]=10 is out of range \[1, S=9\]"):
        select(hidden, cum, index, cu, [1, 1, 10], True)
    with pytest.raises(RuntimeError, match=r"keep\[0\]=6 is out of range \[1, S=5\]"):
        select(hidden, torch.rand(16), torch.arange(16), cu, [6, 1, 1], False)
    with pytest.raises(RuntimeError, match="index_map must have the shape of cum"):
        select(hidden, cum, index[:-1], cu, [1, 1, 1], True)
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        scores(qp, kp, vp[:-1], cu, prev, 1.0, True, True)
    with pytest.raises(RuntimeError, match=r"prev must have shape \(T_c,\)"):
        scores(qp, kp, vp, cu, prev[None], 1.0, True, True)


def test_flow_scores_refuse_zero_heads():
    """H = 0 (a mean over no heads) is refused by name; it read past the end of empty k/v (a crash) before the C++
    check, through the public op as well."""
    from flowcut_kernels import ops

    q, k, v = torch.randn(2, 0, 8), torch.randn(2, 0, 9, 8), torch.randn(2, 0, 9, 8)
    match = r"k must hold at least one head \(H >= 1"
    with pytest.raises(RuntimeError, match=match):
        OPS.native_flow_scores(q, k, v, None, 1.0, True, True)
    with pytest.raises(RuntimeError, match=match):
        ops.flow_scores(q, k, v, scale=1.0, backend="native")
    with pytest.raises(RuntimeError, match=match):
        OPS.native_flow_scores_varlen(q[:1], k[0].transpose(0, 1), v[0].transpose(0, 1), torch.tensor([0, 9]), None,
                                      1.0, True, True)

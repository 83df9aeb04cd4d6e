"""flowcut_kernels.ops: every CPU backend against the reference, opcheck, and clear errors for bad input."""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import FlowCutInputError, available_backends, ops, reference


def inputs(b=2, h=4, s=17, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, s, h, d, generator=g)).to(dtype)
    k = (2 * torch.randn(b, s, h, d, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    return q[:, 0], k, v


def test_available_backends():
    assert "torch" in CPU_BACKENDS
    assert available_backends(torch.device("cpu")) == CPU_BACKENDS
    assert ops.resolve_backend("auto", "cpu") == CPU_BACKENDS[0] != "triton"  # never the slow interpreter
    report = available_backends("cpu", reasons=True)
    assert {name for name, why in report.items() if why is None} == set(CPU_BACKENDS)
    assert all(isinstance(why, str) and why for name, why in report.items() if name not in CPU_BACKENDS)


def test_unavailable_backend_error_gives_the_reason(monkeypatch):
    monkeypatch.setitem(ops.backends.UNAVAILABLE, "native", "flowcut_kernels._C is not built")
    monkeypatch.delitem(ops.backends.BACKENDS, "native", raising=False)
    monkeypatch.setattr(ops.backends, "_RESOLVED", {})  # as mark_unavailable leaves it: nothing resolved before
    q, k, v = inputs()
    with pytest.raises(FlowCutInputError, match=r"backend='native' is not available on cpu \(flowcut_kernels._C is"):
        ops.flow_scores(q, k, v, scale=1.0, backend="native")


@pytest.mark.parametrize("backend", ["auto"] + CPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("has_cls", [True, False])
def test_flow_scores_backends(backend, dtype, tol, has_cls):
    q, k, v = inputs(dtype=dtype)
    n = k.shape[2] - has_cls
    prev = torch.rand(2, n)
    got = ops.flow_scores(q, k, v, prev, scale=8**-0.5, has_cls=has_cls, backend=backend)
    want = reference.flow_scores(q, k, v, prev, 8**-0.5, has_cls, True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("backend", ["auto"] + CPU_BACKENDS)
@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_backends(backend, has_cls):
    b, s, c = 3, 20, 16
    hidden = torch.randn(b, s, c)
    n = s - has_cls
    cum = torch.rand(b, n)
    cum[:, 1::2] = cum[:, :1]  # ties
    index_map = torch.arange(100, 100 + n).expand(b, n)
    for keep in (1, 7, s):
        got = ops.select_gather(hidden, cum, index_map, keep, has_cls=has_cls, backend=backend)
        want = reference.select_gather(hidden, cum, index_map, keep, has_cls)
        for x, y in zip(got, want):
            assert torch.equal(x, y)


def test_select_gather_index_map_none_is_the_identity():
    hidden, cum = torch.randn(2, 17, 8), torch.rand(2, 17)
    for has_cls in (True, False):
        n = 17 - has_cls
        got = ops.select_gather(hidden, cum[:, :n], None, 6, has_cls=has_cls)
        want = ops.select_gather(hidden, cum[:, :n], torch.arange(n).expand(2, n), 6, has_cls=has_cls)
        for x, y in zip(got, want):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float64_inputs(backend):
    """float64 q/k/v and hidden (a float64 model) are taken; the scores are float32 as for every dtype."""
    q, k, v = inputs(dtype=torch.float64)
    cum, entropy, attn = ops.flow_scores(q, k, v, scale=8**-0.5, backend=backend)
    assert cum.dtype == entropy.dtype == attn.dtype == torch.float32
    want = reference.flow_scores(q, k, v, None, 8**-0.5)
    torch.testing.assert_close(cum, want[0], rtol=1e-6, atol=1e-7)
    out = ops.select_gather(k.transpose(1, 2).flatten(2), cum, None, 5, backend=backend)
    assert out[0].dtype == torch.float64


def test_a_backend_that_declines_a_dtype(monkeypatch):
    """"auto" skips a backend that does not take the dtype; naming it says so."""
    half_only = ops.Backend("half-only", ops.backends.BACKENDS["torch"].ops, ("cpu",), (torch.float16,))
    monkeypatch.setitem(ops.backends.BACKENDS, "half-only", half_only)
    monkeypatch.setitem(ops.backends._AUTO_ORDER, "cpu", ("half-only", "torch"))
    assert ops.resolve_backend("auto", "cpu", torch.float16) == "half-only"
    assert ops.resolve_backend("auto", "cpu", torch.float32) == "torch"
    q, k, v = inputs()
    _raises(r"backend='half-only' is not available on cpu \(does not take float32 inputs",
            ops.flow_scores, q, k, v, scale=1.0, backend="half-only")
    assert ops.available_backends("cpu", dtype=torch.float32, reasons=True)["half-only"].startswith("does not take")


def test_prune_count_op():
    hn = torch.tensor([0.7, 0.4])
    assert ops.prune_count(hn, 576, 65, 20) == reference.prune_count(hn, 576, 65, 20) > 0
    assert torch.ops.flowcut.prune_count(hn, 576, 65, 0) == 512
    as_floats = ops.prune_count([0.7, 0.4], 576, 65, 20)
    assert as_floats == ops.prune_count(0.4, 576, 65, 20) == ops.prune_count(hn, 576, 65, 20)


def test_opcheck():
    q, k, v = inputs()
    for prev in (None, torch.rand(2, 16)):
        torch.library.opcheck(torch.ops.flowcut.flow_scores.default, (q, k, v, prev, 0.35, True, True))
    mean_variant = (q, k, v, torch.rand(2, 17), 0.35, False, True)
    torch.library.opcheck(torch.ops.flowcut.flow_scores.default, mean_variant)
    hidden, cum, index_map = torch.randn(2, 17, 8), torch.rand(2, 16), torch.arange(16).repeat(2, 1)
    for keep in (1, 5, 17):
        torch.library.opcheck(torch.ops.flowcut.select_gather.default, (hidden, cum, index_map, keep, True))
    no_cls = (hidden, torch.rand(2, 17), torch.arange(17).repeat(2, 1), 4, False)
    torch.library.opcheck(torch.ops.flowcut.select_gather.default, no_cls)
    torch.library.opcheck(torch.ops.flowcut.prune_count.default, (torch.rand(3), 100, 10, 4))


def test_ops_trace_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 8), torch.empty(2, 4, 33, 8), torch.empty(2, 4, 33, 8)
        cum, hn, attn = ops.flow_scores(q, k, v, scale=1.0)
        assert cum.shape == attn.shape == (2, 32) and hn.shape == (2,)
        out, c, i = ops.select_gather(torch.empty(2, 33, 16), cum, torch.empty(2, 32, dtype=torch.int64), 9)
        assert out.shape == (2, 9, 16) and c.shape == i.shape == (2, 8)


# --- bad input: each names the argument -----------------------------------------------------------

def _raises(match, fn, *args, **kwargs):
    with pytest.raises(FlowCutInputError, match=match):
        fn(*args, **kwargs)


def test_flow_scores_bad_input():
    q, k, v = inputs()
    _raises("q_relay must have shape", ops.flow_scores, q[:, :2], k, v, scale=1.0)
    _raises("q_relay must have shape", ops.flow_scores, q[0], k, v, scale=1.0)
    _raises("k and v must have the same shape", ops.flow_scores, q, k, v[:, :, :5], scale=1.0)
    _raises("k must have shape", ops.flow_scores, q, k[0], v, scale=1.0)
    _raises("prev must have shape", ops.flow_scores, q, k, v, torch.rand(2, 17), scale=1.0)
    _raises("prev must have shape", ops.flow_scores, q, k, v, torch.rand(2, 16), scale=1.0, has_cls=False)
    _raises("prev has dtype", ops.flow_scores, q, k, v, torch.rand(2, 16, dtype=torch.float64), scale=1.0)
    _raises("k has dtype", ops.flow_scores, q, k.int(), v.int(), scale=1.0)
    _raises("q_relay has dtype", ops.flow_scores, q.int(), k, v, scale=1.0)
    _raises("k and v must have the same dtype", ops.flow_scores, q, k, v.half(), scale=1.0)
    _raises("scale must be a float", ops.flow_scores, q, k, v, scale=None)
    _raises("scale must be a float", ops.flow_scores, q, k, v, scale=True)
    _raises("scale must be a float", ops.flow_scores, q, k, v, scale=torch.tensor(1.0))
    _raises(r"backend='cuda-magic' is unknown; the known backends are \[.*'torch'.*\] \(or 'auto'\)",
            ops.flow_scores, q, k, v, scale=1.0, backend="cuda-magic")
    _raises("backend must be a str", ops.flow_scores, q, k, v, scale=1.0, backend=None)
    _raises("S >= 2", ops.flow_scores, q, k[:, :, :1], v[:, :, :1], scale=1.0)
    _raises("v must be a torch.Tensor", ops.flow_scores, q, k, v.tolist(), scale=1.0)
    with pytest.raises(TypeError):  # scale is keyword-only, as documented
        ops.flow_scores(q, k, v, None, 1.0)


def test_select_gather_bad_input():
    hidden, cum, index_map = torch.randn(2, 17, 8), torch.rand(2, 16), torch.arange(16).repeat(2, 1)
    _raises("keep=0 is out of range", ops.select_gather, hidden, cum, index_map, 0)
    _raises("keep=18 is out of range", ops.select_gather, hidden, cum, index_map, 18)
    _raises("keep must be an int", ops.select_gather, hidden, cum, index_map, 3.0)
    _raises("keep must be an int", ops.select_gather, hidden, cum, index_map, True)
    _raises("cum must have shape", ops.select_gather, hidden, cum[:, :5], index_map, 3)
    _raises("index_map must have shape", ops.select_gather, hidden, torch.rand(2, 17), index_map, 3, has_cls=False)
    _raises("cum has dtype", ops.select_gather, hidden, cum.half(), index_map, 3)
    _raises("index_map has dtype", ops.select_gather, hidden, cum, index_map.int(), 3)
    _raises("hidden must have shape", ops.select_gather, hidden[0], cum, index_map, 3)
    _raises("hidden has dtype", ops.select_gather, hidden.int(), cum, index_map, 3)


def test_different_devices_are_refused():
    q, k, v = inputs()
    meta = torch.empty(2, 16, device="meta")
    _raises("prev is on meta but q_relay is on cpu", ops.flow_scores, q, k, v, meta, scale=1.0)
    hidden, index_map = torch.randn(2, 17, 8), torch.arange(16).repeat(2, 1)
    _raises("cum is on meta but hidden is on cpu", ops.select_gather, hidden, meta, index_map, 3)


def test_prune_count_bad_input():
    hn = torch.rand(2)
    _raises("steps_left=-1 is out of range", ops.prune_count, hn, 100, 10, -1)
    _raises("target=0 is out of range", ops.prune_count, hn, 100, 0, 2)
    _raises("n_candidates=5 is out of range", ops.prune_count, hn, 5, 10, 2)
    _raises("entropy must have shape", ops.prune_count, hn[None], 100, 10, 2)
    _raises("entropy must be a torch.Tensor", ops.prune_count, "0.5", 100, 10, 2)


def test_errors_are_standard_exceptions():
    """FlowCutInputError is caught as ValueError, TypeError or RuntimeError alike."""
    hidden, cum, index_map = torch.randn(2, 17, 8), torch.rand(2, 16), torch.arange(16).repeat(2, 1)
    for exc in (ValueError, TypeError, RuntimeError):
        with pytest.raises(exc):
            ops.select_gather(hidden, cum, index_map, 0)

"""The "native" backend (C++ CPU kernels of flowcut_kernels._C) against the reference and the naive oracle."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowcut_kernels
from flowcut_kernels import available_backends, encode, ops, reference, synthetic
from oracle.flowcut import naive_flow_scores, naive_select_gather

_why = available_backends("cpu", reasons=True).get("native", "not registered")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"native backend unavailable: {_why}")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


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
    assert info == _C.build_info()
    assert info["version"] == _C.__version__ == flowcut_kernels.__version__
    assert info["with_cuda"] is _C.WITH_CUDA
    assert info["cuda_archs"] == list(_C.CUDA_ARCHS) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert bool(info["cuda_archs"]) == info["with_cuda"]
    assert native.DEVICE_TYPES == (("cpu", "cuda") if info["with_cuda"] else ("cpu",))
    assert ops.resolve_backend("auto", "cpu") == "native"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
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
    for dtype in (torch.float32, torch.bfloat16):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_layer,target", [(-1, 8), (-2, 30), (-4, 1)])
def test_encode_native_equals_torch(tiny_clip, dtype, feature_layer, target):
    model = synthetic.random_clip_vision("tiny", seed=3, sharpen=8.0, dtype=dtype)
    pixels = synthetic.random_pixels(model, 3, seed=3)
    with torch.no_grad():
        got = encode(model, pixels, target, feature_layer=feature_layer, backend="native")
        want = encode(model, pixels, target, feature_layer=feature_layer, backend="torch")
    assert got.tokens_per_layer == want.tokens_per_layer
    assert torch.equal(got.keep_indices, want.keep_indices)
    torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-5)


def test_missing_extension_is_a_reason_not_an_import_error(tmp_path):
    """Without _C the package imports, "native" is unavailable, and the reason says how to build it."""
    package = Path(flowcut_kernels.__file__).parent
    shutil.copytree(package, tmp_path / "flowcut_kernels", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    code = (  # an editable install's import hook would find the real _C: drop it
        "import sys; sys.meta_path[:] = [m for m in sys.meta_path if '__editable__' not in "
        "getattr(m, '__module__', '')]; import flowcut_kernels as f; r = f.available_backends('cpu', reasons=True); "
        "assert f.__file__.startswith(%r), f.__file__; print(r['native'])" % str(tmp_path)
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "pip install --no-build-isolation -e ." in out.stdout and "_C" in out.stdout

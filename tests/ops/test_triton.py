"""The "triton" backend: both kernels against the reference and the SPEC oracle.

On CPU they run under TRITON_INTERPRET=1 (conftest.py) at small shapes; the full-shape and
torch.compile tests need CUDA and are skipped without it.
"""

import pytest
import torch

from flowcut_kernels import available_backends, ops, reference
from oracle.flowcut import naive_flow_scores, naive_select_gather

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")
if "triton" not in available_backends("cpu") + available_backends("cuda"):
    pytest.skip(f"triton backend unavailable: {available_backends('cpu', reasons=True)}", allow_module_level=True)

from flowcut_kernels.ops.triton import flow_scores as tfs  # noqa: E402
from flowcut_kernels.ops.triton import select_gather as tsg  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def qkv(b, h, s, d, dtype, seed, device=DEVICE, q_dtype=None):
    """q_relay (B, H, D) and k, v (B, H, S, D) as HF hands them: transposed views of (B, S, H, D)."""
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, s, h, d, generator=g)).to(q_dtype or dtype)
    k = (2 * torch.randn(b, s, h, d, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    return q[:, 0].to(device), k.to(device), v.to(device)


def poisoned_scores(k, has_cls):
    return tuple(t.fill_(float("nan")) for t in tfs.flow_scores_outputs(k, has_cls))


def assert_scores_close(got, want, dtype):
    tol = TOLERANCES[dtype]
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        torch.testing.assert_close(x, y.float(), rtol=tol, atol=tol * 1e-2)


# --------------------------------------------------------------------------------------------
# flow_scores


VARIANTS = [(True, True), (True, False), (False, True)]  # (has_cls, semantic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 2, 4), (2, 3, 17, 8), (3, 4, 70, 24), (1, 2, 200, 80)])
def test_flow_scores_matches_reference(dtype, shape):
    """Every variant, prev None / strided, both launch paths (fused, split), poisoned outputs."""
    b, h, s, d = shape
    q, k, v = qkv(b, h, s, d, dtype, seed=s + h)
    for i, (has_cls, semantic) in enumerate(VARIANTS):
        n = s - has_cls
        prev = torch.rand(b, 2 * n, device=DEVICE)[:, ::2]
        for j, p in enumerate((None, prev)):
            split = (i + j) % 2 == 1
            out = poisoned_scores(k, has_cls)
            tfs.flow_scores_into(q, k, v, p, d**-0.5, has_cls, semantic, *out, split=split)
            assert_scores_close(out, reference.flow_scores(q, k, v, p, d**-0.5, has_cls, semantic), dtype)


def test_flow_scores_matches_spec_oracle():
    q, k, v = qkv(2, 3, 40, 16, torch.float32, seed=7)
    prev = torch.rand(2, 39, device=DEVICE)
    for has_cls, semantic in ((True, True), (True, False), (False, True)):
        p = prev if has_cls else torch.rand(2, 40, device=DEVICE)
        got = ops.flow_scores(q, k, v, p, scale=0.25, has_cls=has_cls, semantic=semantic, backend="triton")
        want = naive_flow_scores(q.cpu(), k.cpu(), v.cpu(), p.cpu(), 0.25, has_cls, semantic)
        for x, y in zip(got, want):
            torch.testing.assert_close(x.cpu().double(), y.double(), rtol=1e-5, atol=1e-7)


def test_flow_scores_mixed_dtypes_and_layouts():
    """q_relay in float32 with bf16 k/v (mean-variant queries), and contiguous (B, H, S, D) k/v."""
    q, k, v = qkv(2, 2, 33, 8, torch.bfloat16, seed=3, q_dtype=torch.float32)
    k, v = k.contiguous(), v.contiguous()[..., :8]
    want = reference.flow_scores(q, k, v, None, 0.3, False, True)
    assert_scores_close(ops.flow_scores(q, k, v, scale=0.3, has_cls=False, backend="triton"), want, torch.bfloat16)


def test_flow_scores_long_sequence_split():
    """A long single image (the Qwen2-VL case) takes the split path over many chunks."""
    q, k, v = qkv(1, 2, 4100, 8, torch.float16, seed=1)
    out = poisoned_scores(k, False)
    tfs.flow_scores_into(q, k, v, None, 0.35, False, True, *out)
    assert_scores_close(out, reference.flow_scores(q, k, v, None, 0.35, False, True), torch.float16)


def test_flow_scores_concentrated_attention():
    """Nearly one-hot attention (large logits): the softmax stays finite and the entropy near 0."""
    q, k, v = qkv(2, 2, 50, 8, torch.float32, seed=5)
    q = q * 40
    got = ops.flow_scores(q, k, v, scale=1.0, backend="triton")
    assert_scores_close(got, reference.flow_scores(q, k, v, None, 1.0, True, True), torch.float32)
    assert (got[1] < 0.2).all()


# --------------------------------------------------------------------------------------------
# select_gather


def poisoned_gather(hidden, cum, keep, has_cls):
    out = tsg.select_gather_outputs(hidden, cum, keep, has_cls)
    poison = float("nan") if hidden.dtype.is_floating_point else -7
    return out[0].fill_(poison), out[1].fill_(float("nan")), out[2].fill_(-1)


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, (2, 17, 40)),
        (torch.float32, (2, 150, 300)),
        (torch.bfloat16, (3, 70, 130)),
        (torch.float16, (1, 2, 8)),
        (torch.float64, (2, 40, 24)),
    ],
)
@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_matches_reference(dtype, shape, has_cls):
    """Strided hidden rows and scores, keep from 1 to all, poisoned outputs, exact agreement."""
    b, s, c = shape
    g = torch.Generator().manual_seed(s * c)
    hidden = torch.randn(b, c, s, generator=g).to(dtype).transpose(1, 2).to(DEVICE)  # strided rows
    n = s - has_cls
    cum = torch.rand(b, 2 * n, generator=g).to(DEVICE)[:, ::2]  # strided scores
    index_map = torch.randperm(10 * b * n, generator=g)[: b * n].reshape(b, n).to(DEVICE)
    for keep in sorted({1, s // 3 + 1, s}):
        out = poisoned_gather(hidden, cum, keep, has_cls)
        tsg.select_gather_into(hidden, cum, index_map, keep, has_cls, *out)
        for x, y in zip(out, reference.select_gather(hidden, cum, index_map, keep, has_cls)):
            assert torch.equal(x, y), (keep, x, y)


@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_ties_signs_and_oracle(has_cls):
    """Many equal scores (lower index wins), negative scores and ±0.0, against the SPEC oracle."""
    b, s, c = 3, 45, 24
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(b, s, c, generator=g, device="cpu").to(DEVICE)
    n = s - has_cls
    cum = torch.randint(-3, 4, (b, n), generator=g).float()
    cum[0, ::3] = -0.0
    cum[1] = 1.0  # every score tied
    cum = cum.to(DEVICE)
    index_map = torch.arange(n).repeat(b, 1).to(DEVICE) + 1000
    for keep in (1, 2, 9, 20, s):
        got = ops.select_gather(hidden, cum, index_map, keep, has_cls=has_cls, backend="triton")
        want = naive_select_gather(hidden.cpu(), cum.cpu(), index_map.cpu(), keep, has_cls)
        for x, y in zip(got, want):
            assert torch.equal(x.cpu(), y), keep


def test_select_gather_many_candidates():
    """More candidates than one search block (the multi-block threshold search), with ties."""
    g = torch.Generator().manual_seed(2)
    n = tsg.MAX_BLOCK_SEARCH + 77
    hidden = torch.randn(2, n + 1, 16, generator=g).to(DEVICE)
    cum = (torch.rand(2, n, generator=g) * 50).round().to(DEVICE)
    index_map = torch.arange(n, device=DEVICE).repeat(2, 1)
    for keep in (2, 300, n + 1):
        got = ops.select_gather(hidden, cum, index_map, keep, backend="triton")
        for x, y in zip(got, reference.select_gather(hidden, cum, index_map, keep, True)):
            assert torch.equal(x, y), keep


# --------------------------------------------------------------------------------------------
# op registration


def test_backend_registered():
    assert "triton" in available_backends("cpu" if not CUDA else "cuda")
    if CUDA:
        assert ops.resolve_backend("auto", "cuda") == "triton"
    else:
        assert ops.resolve_backend("auto", "cpu") != "triton"  # the interpreter is never chosen for speed


def test_opcheck():
    q, k, v = qkv(2, 2, 17, 8, torch.float32, seed=0)
    for args in ((q, k, v, None, 0.35, True, True), (q, k, v, torch.rand(2, 17, device=DEVICE), 0.35, False, True)):
        torch.library.opcheck(torch.ops.flowcut.triton_flow_scores.default, args)
    hidden, cum = torch.randn(2, 17, 8, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    index_map = torch.arange(16, device=DEVICE).repeat(2, 1)
    for keep in (1, 6, 17):
        torch.library.opcheck(torch.ops.flowcut.triton_select_gather.default, (hidden, cum, index_map, keep, True))


# --------------------------------------------------------------------------------------------
# GPU only: full shapes, torch.compile


cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("b,h,s,d", [(1, 16, 577, 64), (16, 16, 577, 64), (1, 16, 16384, 80)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_shapes_cuda(b, h, s, d, dtype):
    q, k, v = qkv(b, h, s, d, dtype, seed=0, device="cuda")
    prev = torch.rand(b, s - 1, device="cuda")
    got = ops.flow_scores(q, k, v, prev, scale=d**-0.5, backend="triton")
    assert_scores_close(got, reference.flow_scores(q, k, v, prev, d**-0.5, True, True), dtype)
    hidden = torch.randn(b, s, h * d, device="cuda", dtype=dtype)
    index_map = torch.arange(s - 1, device="cuda").repeat(b, 1)
    for keep in (65, s // 2):
        got = ops.select_gather(hidden, got[0], index_map, keep, backend="triton")
        for x, y in zip(got, reference.select_gather(hidden, got[0], index_map, keep, True)):
            assert torch.equal(x, y)


@cuda_only
def test_torch_compile_fullgraph_cuda():
    q, k, v = qkv(2, 4, 65, 32, torch.float16, seed=0, device="cuda")
    hidden = torch.randn(2, 65, 128, device="cuda", dtype=torch.float16)
    index_map = torch.arange(64, device="cuda").repeat(2, 1)

    def step(q, k, v, hidden, index_map):
        cum, _, _ = ops.flow_scores(q, k, v, scale=0.2, backend="triton")
        return ops.select_gather(hidden, cum, index_map, 17, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    for x, y in zip(compiled(q, k, v, hidden, index_map), step(q, k, v, hidden, index_map)):
        assert torch.equal(x, y)

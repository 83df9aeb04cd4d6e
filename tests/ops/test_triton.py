"""The "triton" backend: both kernels, on dense and packed (varlen) batches, against the reference and the
float64 oracle (docs/semantics.md).

On CPU they run under TRITON_INTERPRET=1 (conftest.py) at small shapes; the full-shape and
torch.compile tests need CUDA and are skipped without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowcut_kernels import FlowCutInputError, available_backends, ops, reference
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


def poisoned_scores(k, has_cls, cu_seqlens=None):
    return tuple(t.fill_(float("nan")) for t in tfs.flow_scores_outputs(k, has_cls, cu_seqlens))


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


def test_flow_scores_matches_the_oracle():
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
# flow_scores: hard numerics, against the float64 oracle


def assert_matches_oracle(got, want, rtol):
    """Triton's (cum, Hn, attn) against the oracle's float64 ones: finite, within rtol (atol: rtol·1e-3 of
    each output's largest value; Hn ∈ [0, 1] to rtol·1e-2)."""
    for name, x, y in zip(("cum", "entropy", "attn"), got, want):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), (name, x)
        y = y.to(x.device)
        atol = rtol * 1e-2 if name == "entropy" else max(rtol * 1e-3 * float(y.abs().max()), 1e-37)
        torch.testing.assert_close(x.double(), y, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_same_kept(cum, want, has_cls, rtol):
    """select_gather on Triton's cum keeps the oracle's best candidates, at the keep count between N/8 and N/2
    (scores not underflowed) where the oracle's scores are furthest from a tie."""
    n = want.shape[1]
    ranked = want.sort(dim=-1, descending=True).values
    gap = (ranked[:, :-1] - ranked[:, 1:]) / ranked[:, :-1]  # relative gap after rank i
    usable = (ranked[:, 1:] > 1e-30 * ranked[:, :1]).all(dim=0)
    gap = gap.nan_to_num(0.0).amin(dim=0).where(usable, 0.0)
    n_keep = n // 8 + int(gap[n // 8 : max(n // 2, n // 8 + 1)].argmax()) + 1
    assert gap[n_keep - 1] > 3 * rtol, "no untied keep count"
    hidden = torch.arange(cum.numel() + cum.shape[0] * has_cls, dtype=torch.float32, device=cum.device)
    hidden = hidden.reshape(cum.shape[0], -1, 1)
    got = ops.select_gather(hidden, cum, None, n_keep + has_cls, has_cls=has_cls, backend="triton")[2]
    index_map = torch.arange(n).expand_as(want)
    expected = naive_select_gather(hidden.cpu(), want, index_map, n_keep + has_cls, has_cls)[2]
    assert torch.equal(got.cpu(), expected), (n_keep, got, expected)


def oracle_case(q, k, v, scale, has_cls, semantic, rtol, split=None):
    """Triton (fused or split path) against the oracle on the same inputs, then the kept indices."""
    out = poisoned_scores(k, has_cls)
    tfs.flow_scores_into(q, k, v, None, scale, has_cls, semantic, *out, split=split)
    want = naive_flow_scores(q.cpu(), k.cpu(), v.cpu(), None, scale, has_cls, semantic)
    assert_matches_oracle(out, want, rtol)
    assert_same_kept(out[0], want[0], has_cls, rtol)
    return out, want


@pytest.mark.parametrize(
    "has_cls,semantic,split", [(True, True, False), (True, True, True), (True, False, True), (False, True, False)]
)
def test_flow_scores_large_norms(has_cls, semantic, split):
    """q, k, v ~ N(0, 9) at CLIP-L's shape; image 1's values scaled per head to norms 1 … 1e3. The relay takes
    almost all the semantic mass (every candidate's Sm underflows): NaN without the stable normalisation."""
    b, h, s, d = 2, 16, 577, 64
    g = torch.Generator().manual_seed(21)
    q, k, v = (3 * torch.randn(b, s, h, d, generator=g) for _ in range(3))
    v[1] *= torch.logspace(0, 3, h)[:, None] / d**0.5
    q, k, v = q[:, 0].to(DEVICE), k.transpose(1, 2).to(DEVICE), v.transpose(1, 2).to(DEVICE)
    oracle_case(q, k, v, d**-0.5, has_cls, semantic, rtol=1e-3, split=split)


@pytest.mark.parametrize("semantic", [True, False])
def test_flow_scores_one_hot_relay(semantic):
    """The relay logit 1000 above every candidate's (and v_0 dominant): A underflows to exactly 0, p stays exact."""
    b, h, s, d = 2, 4, 50, 16
    q, k, v = qkv(b, h, s, d, torch.float32, seed=8)
    k[:, :, 0] = q * (1000 / (0.25 * q.square().sum(-1, keepdim=True)))  # scale·r_h·k_h[0] = 1000
    v[:, :, 0] *= 100
    (_, _, attn), _ = oracle_case(q, k, v, 0.25, True, semantic, rtol=1e-3)  # weights: exp of d_h ≈ −1000
    assert (attn == 0).all()


@pytest.mark.parametrize("has_cls,semantic", VARIANTS)
def test_flow_scores_all_equal(has_cls, semantic):
    """Equal logits and values: uniform p, Hn = 1, equal scores, and the lowest indices kept."""
    b, h, s, d = 2, 3, 40, 8
    q, k, v = qkv(b, h, s, d, torch.float32, seed=9)
    k, v = torch.zeros_like(k), v[:, :, :1].expand(-1, -1, s, -1)
    got = ops.flow_scores(q, k, v, scale=0.3, has_cls=has_cls, semantic=semantic, backend="triton")
    assert_matches_oracle(got, naive_flow_scores(q.cpu(), k.cpu(), v.cpu(), None, 0.3, has_cls, semantic), 1e-5)
    torch.testing.assert_close(got[1], torch.ones(b, device=DEVICE), rtol=0, atol=1e-6)
    assert (got[0] == got[0][:, :1]).all()
    hidden = torch.randn(b, s, 4, device=DEVICE)
    kept = ops.select_gather(hidden, got[0], None, 7 + has_cls, has_cls=has_cls, backend="triton")[2]
    assert torch.equal(kept.cpu(), torch.arange(7).expand(b, 7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_cls,semantic", [(True, True), (False, True)])
def test_flow_scores_half_inputs_with_large_logits(dtype, has_cls, semantic):
    """Entries ≈ 40: every dot product (≈ 1e5) overflows float16; the kernels accumulate in float32."""
    b, h, s, d = 2, 2, 90, 64
    g = torch.Generator().manual_seed(12)
    q, k, v = ((40 + torch.randn(b, s, h, d, generator=g)).to(dtype).to(DEVICE) for _ in range(3))
    q, k, v = q[:, 0], k.transpose(1, 2), v.transpose(1, 2)
    assert torch.isinf((k[0, 0, :1].float() @ k[0, 0].float().T).half()).all()
    oracle_case(q, k, v, 0.01, has_cls, semantic, rtol=1e-2)


@pytest.mark.parametrize("split", [True, False])
def test_flow_scores_merge_rescales_running_sums(split):
    """> 64 chunks, so phase 2 merges several BLOCK_C blocks of chunk statistics, with the largest relay and
    semantic logits in the last chunk: a merge that does not rescale its running sum to a new max is wrong."""
    s = tfs.BLOCK_S * (tfs.BLOCK_C + 2) + 5
    q, k, v = qkv(1, 2, s, 8, torch.float32, seed=4)
    k[:, :, -1] = q * (30 / (0.35 * q.square().sum(-1, keepdim=True)))  # the last token's logit 30, others ≲ 15
    v[:, :, -1] = 3 * v[:, :, 0]
    out = poisoned_scores(k, True)
    tfs.flow_scores_into(q, k, v, None, 0.35, True, True, *out, split=split)
    assert_matches_oracle(out, naive_flow_scores(q.cpu(), k.cpu(), v.cpu(), None, 0.35, True, True), 1e-4)


# --------------------------------------------------------------------------------------------
# select_gather


def poisoned_gather(hidden, cum, keep, has_cls, cu_seqlens=None):
    """select_gather_outputs, hidden_out, cum_out and index_out poisoned (cu_seqlens_out as given, packed)."""
    out = tsg.select_gather_outputs(hidden, cum, keep, has_cls, cu_seqlens)
    for t, poison in zip(out, (float("nan"), float("nan"), -1)):
        t.fill_(poison)
    return out


@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, (2, 17, 40)),
        (torch.float32, (2, 150, 300)),
        (torch.bfloat16, (3, 70, 130)),
        (torch.float16, (1, 2, 8)),
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
        tsg.select_gather_into(hidden, cum, index_map, has_cls, *out)
        for x, y in zip(out, reference.select_gather(hidden, cum, index_map, keep, has_cls)):
            assert torch.equal(x, y), (keep, x, y)


@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_ties_signs_and_oracle(has_cls):
    """Many equal scores (lower index wins), negative scores and ±0.0, against the float64 oracle."""
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


@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_nan_ranks_first(has_cls):
    """Every NaN (either sign, any payload) ranks above +inf and NaNs among themselves by lower index, as
    torch.sort(descending=True, stable=True) does; with ±inf, ±0.0 and ties, keeps from 1 to S, bit-exact."""
    bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0, 0x3F800000]
    specials = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert torch.tensor(float("nan")).neg().view(torch.int32) == specials[1:2].view(torch.int32)  # −NaN
    b, s, c = 2, 41, 8
    n = s - has_cls
    g = torch.Generator().manual_seed(5)
    cum = specials[torch.randint(len(bits), (b, n), generator=g)]
    cum[1, n // 2 :] = torch.randn(n - n // 2, generator=g)  # image 1: NaNs and infinities above plain numbers
    cum, hidden = cum.to(DEVICE), torch.randn(b, s, c, generator=g).to(DEVICE)
    index_map = torch.arange(n, device=DEVICE).repeat(b, 1)
    for keep in (*range(1, s, 3), s):
        out = poisoned_gather(hidden, cum, keep, has_cls)
        tsg.select_gather_into(hidden, cum, index_map, has_cls, *out)
        want = reference.select_gather(hidden, cum, index_map, keep, has_cls)
        assert torch.equal(out[0], want[0]) and torch.equal(out[2], want[2]), keep
        assert torch.equal(out[1].view(torch.int32), want[1].view(torch.int32)), keep


# --------------------------------------------------------------------------------------------
# packed (varlen) batches: the same kernels, images of different lengths along one token axis


def cu_seqlens(lens, dtype=torch.int32):
    return torch.tensor([0, *lens]).cumsum(0).to(dtype).to(DEVICE)


def segments(lens, has_cls):
    """(rows, candidates) slices of each image of a packed batch."""
    row = cand = 0
    for s in lens:
        yield slice(row, row + s), slice(cand, cand + s - has_cls)
        row, cand = row + s, cand + s - has_cls


def packed_qkv(lens, h, d, dtype, seed):
    """q_relay (B, H, D) and k, v (T, H, D) strided views: k of an (H, T, D) tensor, v every other head of a
    (T, 2H, D) one."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = (2 * torch.randn(len(lens), h, d, generator=g)).to(dtype).to(DEVICE)
    k = (2 * torch.randn(h, t, d, generator=g)).to(dtype).to(DEVICE).transpose(0, 1)
    v = torch.randn(t, 2 * h, d, generator=g).to(dtype).to(DEVICE)[:, ::2]
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cands,h,d", [((1,), 1, 4), ((16, 1, 69), 3, 8), ((3, 130, 1, 40), 4, 24)])
def test_flow_scores_varlen_matches_reference(dtype, cands, h, d):
    """Ragged batches of these candidate counts (one candidate: S = 2 with CLS, S = 1 mean), strided k/v views,
    int32/int64 offsets, every variant, prev None / strided, both launch paths, poisoned outputs."""
    for i, (has_cls, semantic) in enumerate(VARIANTS):
        lens = [n + has_cls for n in cands]
        q, k, v = packed_qkv(lens, h, d, dtype, seed=sum(lens) + h)
        cu = cu_seqlens(lens, (torch.int32, torch.int64)[i % 2])
        prev = torch.rand(2 * sum(cands), device=DEVICE)[::2]
        for j, p in enumerate((None, prev)):
            out = poisoned_scores(k, has_cls, cu)
            tfs.flow_scores_into(q, k, v, p, d**-0.5, has_cls, semantic, *out, cu_seqlens=cu, split=(i + j) % 2 == 1)
            assert_scores_close(out, reference.flow_scores_varlen(q, k, v, cu, p, d**-0.5, has_cls, semantic), dtype)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("has_cls,semantic", VARIANTS)
def test_flow_scores_varlen_is_dense_per_image(has_cls, semantic, split):
    """Each image of a packed batch gets bit for bit the dense op's scores on its segment alone, and those match
    the float64 oracle."""
    cands = (5, 1, 90, 33)
    lens = [n + has_cls for n in cands]
    q, k, v = packed_qkv(lens, 3, 16, torch.float32, seed=13)
    cu = cu_seqlens(lens)
    prev = torch.rand(sum(cands), device=DEVICE)
    out = poisoned_scores(k, has_cls, cu)
    tfs.flow_scores_into(q, k, v, prev, 0.25, has_cls, semantic, *out, cu_seqlens=cu, split=split)
    for b, (rows, cand) in enumerate(segments(lens, has_cls)):
        qb, pb = q[b : b + 1], prev[cand][None]
        kb, vb = (x[rows].transpose(0, 1)[None] for x in (k, v))  # (1, H, S_b, D)
        dense = poisoned_scores(kb, has_cls)
        tfs.flow_scores_into(qb, kb, vb, pb, 0.25, has_cls, semantic, *dense, split=split)
        for x, y in zip((out[0][cand], out[1][b : b + 1], out[2][cand]), (dense[0][0], dense[1], dense[2][0])):
            assert torch.equal(x, y), b
        want = naive_flow_scores(qb.cpu(), kb.cpu(), vb.cpu(), pb.cpu(), 0.25, has_cls, semantic)
        assert_matches_oracle(dense, want, 1e-5)


@pytest.mark.parametrize("has_cls", [True, False])
def test_flow_scores_varlen_long_image(has_cls):
    """A long image (> BLOCK_C chunks, its largest logits in the last chunk) between short ones: the size rule
    takes the split path (a grid of chunk slots), bit for bit the fused path's scores, and the reference's."""
    cands = (6, tfs.BLOCK_S * (tfs.BLOCK_C + 2) + 5, 1, 64)
    lens = [n + has_cls for n in cands]
    assert sum(lens) - (len(lens) - 1) * (1 + has_cls) >= tfs.SPLIT_MIN_TOKENS  # the bound the rule uses
    q, k, v = packed_qkv(lens, 2, 8, torch.float16, seed=4)
    end = sum(lens[:2]) - 1  # the long image's last token
    k[end] = (q[1] * (30 / (0.35 * q[1].float().square().sum(-1, keepdim=True)))).half()  # its logit 30
    v[end] = 3 * v[lens[0]]
    cu = cu_seqlens(lens)
    outs = [poisoned_scores(k, has_cls, cu) for _ in range(2)]
    for out, split in zip(outs, (None, False)):
        tfs.flow_scores_into(q, k, v, None, 0.35, has_cls, True, *out, cu_seqlens=cu, split=split)
    assert all(torch.equal(x, y) for x, y in zip(*outs))
    assert_scores_close(outs[0], reference.flow_scores_varlen(q, k, v, cu, None, 0.35, has_cls, True), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_varlen_matches_reference(dtype, has_cls):
    """Ragged images (one with a single candidate), strided hidden rows (two column blocks) and scores, heavy
    ties, keep counts from 1 to all per image, int32/int64 offsets, poisoned outputs: exact agreement."""
    cands = (1, 40, 7, 150)
    lens = [n + has_cls for n in cands]
    n = sum(cands)
    g = torch.Generator().manual_seed(n + has_cls)
    hidden = torch.randn(130, sum(lens), generator=g).to(dtype).to(DEVICE).T  # (T, C) with strided rows
    cum = (4 * torch.rand(2 * n, generator=g)).floor().to(DEVICE)[::2]
    index_map = torch.randperm(10 * n, generator=g)[:n].to(DEVICE)
    keeps = ([1] * 4, [s // 3 + 1 for s in lens], lens, [1, 2, lens[2], 100])
    for i, keep in enumerate(keeps):
        cu = cu_seqlens(lens, (torch.int32, torch.int64)[i % 2])
        out = poisoned_gather(hidden, cum, keep, has_cls, cu)
        tsg.select_gather_into(hidden, cum, index_map, has_cls, *out, cu_seqlens=cu)
        for x, y in zip(out, reference.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls)):
            assert x.dtype == y.dtype and torch.equal(x, y), (keep, x, y)


@pytest.mark.parametrize("has_cls", [True, False])
def test_select_gather_varlen_oracle_and_nan(has_cls):
    """One image past a search block (the multi-block threshold search) next to small ones; ties, ±0.0, ±inf and
    negatives against the oracle per image; then NaNs of either sign ranked first, as the reference does."""
    cands = (3, tsg.MAX_BLOCK_SEARCH + 77, 30)
    lens = [n + has_cls for n in cands]
    n = sum(cands)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(sum(lens), 8, generator=g).to(DEVICE)
    cum = torch.randint(-3, 4, (n,), generator=g).float()
    cum[::7], cum[1::11], cum[2::13], cum[3::17] = -0.0, float("inf"), float("-inf"), 0.0
    index_map = torch.arange(n, device=DEVICE) + 1000
    cu = cu_seqlens(lens)
    for keep in ([1, 1, 1], [2, 300, 9], lens):
        got = ops.select_gather_varlen(hidden, cum.to(DEVICE), index_map, cu, keep, has_cls=has_cls, backend="triton")
        offsets = got[3].tolist()
        assert torch.equal(got[3], cu_seqlens(keep))
        for b, (rows, cand) in enumerate(segments(lens, has_cls)):
            want = naive_select_gather(hidden[rows][None].cpu(), cum[cand][None], index_map[cand][None].cpu(),
                                       keep[b], has_cls)
            kept = slice(offsets[b] - b * has_cls, offsets[b + 1] - (b + 1) * has_cls)
            for x, y in zip((got[0][offsets[b] : offsets[b + 1]], got[1][kept], got[2][kept]), want):
                assert torch.equal(x.cpu(), y[0]), (keep, b)
    cum[n // 3 :: 5] = float("nan")
    cum[n // 2 :: 9] = -float("nan")
    cum = cum.to(DEVICE)
    for keep in ([1, 1, 1], [2, 300, 9], [3, 700, 30]):
        got = ops.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls=has_cls, backend="triton")
        want = reference.select_gather_varlen(hidden, cum, index_map, cu, keep, has_cls)
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32)), keep
        assert all(torch.equal(got[i], want[i]) for i in (0, 2, 3)), keep


def test_varlen_public_ops():
    """The public packed ops choose and run the triton backend: index_map None (each image's 0 … N_b − 1) and
    keep as a tensor, as the reference backend."""
    assert "triton" in available_backends(DEVICE, op=("flow_scores_varlen", "select_gather_varlen"))
    lens = [3, 9, 2]
    q, k, v = packed_qkv(lens, 2, 8, torch.float32, seed=6)
    cu = cu_seqlens(lens)
    scores = {name: ops.flow_scores_varlen(q, k, v, cu, scale=0.3, backend=name) for name in ("triton", "torch")}
    assert_scores_close(scores["triton"], scores["torch"], torch.float32)
    hidden = torch.randn(sum(lens), 5, device=DEVICE)
    keep = torch.tensor([2, 5, 1])
    got, want = (ops.select_gather_varlen(hidden, scores["torch"][0], None, cu, keep, backend=name)
                 for name in ("triton", "torch"))
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def check_big_offsets():
    """flow_scores (both paths, every variant) and select_gather on views whose image 2 lies past element 2^31
    of one float16 buffer, dense and packed, against the reference on the same views (run in a subprocess by
    the test below).

    The strides (dense: the batch stride 2^30 + 2^12; packed: the row stride) fit int32, so only 64-bit
    arithmetic gets image·stride right (a stride ≥ 2^31 would reach the kernels as a 64-bit integer and widen
    the product by itself)."""
    big = torch.empty(2**31 + 2**20, dtype=torch.float16, device=DEVICE)  # virtual: only touched pages count
    g = torch.Generator().manual_seed(0)
    b, h, s, d = 3, 2, 70, 8
    batch = 2**30 + 2**12
    offset = 0

    def view(size, stride):
        nonlocal offset
        t = torch.as_strided(big, size, (batch, *stride), offset)
        t.copy_(torch.randn(size, generator=g))  # touches the images only
        offset += t[0].numel()
        return t

    q, k, v = view((b, h, d), (d, 1)), view((b, h, s, d), (d, h * d, 1)), view((b, h, s, d), (d, h * d, 1))
    hidden = view((b, s, h * d), (h * d, 1))
    for has_cls, semantic in VARIANTS:
        want = reference.flow_scores(q, k, v, None, 0.3, has_cls, semantic)
        for split in (False, True):
            out = poisoned_scores(k, has_cls)
            tfs.flow_scores_into(q, k, v, None, 0.3, has_cls, semantic, *out, split=split)
            assert_scores_close(out, want, torch.float16)
    cum = torch.rand(b, s - 1, generator=g).to(DEVICE)
    index_map = torch.arange(s - 1, device=DEVICE).repeat(b, 1)
    for keep in (1, 30, s):
        out = poisoned_gather(hidden, cum, keep, True)
        tsg.select_gather_into(hidden, cum, index_map, True, *out)
        for x, y in zip(out, reference.select_gather(hidden, cum, index_map, keep, True)):
            assert torch.equal(x, y), keep
    # A packed batch: rows 2^31 / (T − 1) elements apart (an int32 stride), the last ones past element 2^31.
    lens = [s, s - 1, s + 1]
    rows = sum(lens)
    row = 2**31 // (rows - 1) + 1
    k, v, hidden = (torch.as_strided(big, (rows, h * d), (row, 1), offset + i * h * d) for i in range(3))
    for t in (k, v, hidden):
        t.copy_(torch.randn(t.shape, generator=g))
    k, v = k.unflatten(1, (h, d)), v.unflatten(1, (h, d))
    cu = cu_seqlens(lens, torch.int64)
    for has_cls, semantic in VARIANTS:
        want = reference.flow_scores_varlen(q, k, v, cu, None, 0.3, has_cls, semantic)
        for split in (False, True):
            out = poisoned_scores(k, has_cls, cu)
            tfs.flow_scores_into(q, k, v, None, 0.3, has_cls, semantic, *out, cu_seqlens=cu, split=split)
            assert_scores_close(out, want, torch.float16)
    cum = torch.rand(rows - b, generator=g).to(DEVICE)
    index_map = torch.arange(rows - b, device=DEVICE)
    for keep in ([1, 1, 1], [30, 2, 50], lens):
        out = poisoned_gather(hidden, cum, keep, True, cu)
        tsg.select_gather_into(hidden, cum, index_map, True, *out, cu_seqlens=cu)
        for x, y in zip(out, reference.select_gather_varlen(hidden, cum, index_map, cu, keep, True)):
            assert torch.equal(x, y), keep


def test_int64_addresses():
    """Element offsets past 2^31 (:func:`check_big_offsets`), in a subprocess: 32-bit address arithmetic would
    read outside the buffer, which can crash the interpreter."""
    here = Path(__file__).parent
    path = [str(here), str(here.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    code = "import test_triton; test_triton.check_big_offsets()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit status {run.returncode} (-11: a segfault)\n{run.stderr[-4000:]}"


# --------------------------------------------------------------------------------------------
# op registration


def test_backend_registered():
    assert "triton" in available_backends("cpu" if not CUDA else "cuda")
    if CUDA:
        assert ops.resolve_backend("auto", "cuda") == "triton"
    else:
        assert ops.resolve_backend("auto", "cpu") != "triton"  # the interpreter is never chosen for speed


def test_float64_declined():
    """Triton takes float16/bfloat16/float32: "auto" gives float64 inputs to another backend; naming it fails."""
    assert "triton" not in available_backends(DEVICE, dtype=torch.float64)
    assert ops.resolve_backend("auto", DEVICE, torch.float64) != "triton"
    q, k, v = qkv(1, 2, 9, 4, torch.float64, seed=0)
    with pytest.raises(FlowCutInputError, match="does not take float64"):
        ops.flow_scores(q, k, v, scale=0.5, backend="triton")
    hidden = torch.randn(1, 9, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(FlowCutInputError, match="does not take float64"):
        ops.select_gather(hidden, torch.rand(1, 8, device=DEVICE), None, 3, backend="triton")
    hidden = hidden.float()  # select_gather goes by the hidden states' dtype
    ops.select_gather(hidden, torch.rand(1, 8, device=DEVICE), None, 3, backend="triton")


def test_opcheck():
    q, k, v = qkv(2, 2, 17, 8, torch.float32, seed=0)
    for args in ((q, k, v, None, 0.35, True, True), (q, k, v, torch.rand(2, 17, device=DEVICE), 0.35, False, True)):
        torch.library.opcheck(torch.ops.flowcut.triton_flow_scores.default, args)
    hidden, cum = torch.randn(2, 17, 8, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    index_map = torch.arange(16, device=DEVICE).repeat(2, 1)
    for keep in (1, 6, 17):
        torch.library.opcheck(torch.ops.flowcut.triton_select_gather.default, (hidden, cum, index_map, keep, True))


def test_opcheck_varlen():
    lens = [5, 2, 17]
    q, k, v = packed_qkv(lens, 2, 8, torch.float32, seed=0)
    cu = cu_seqlens(lens)
    prev = torch.rand(24, device=DEVICE)
    for args in ((q, k, v, cu, None, 0.35, True, True), (q, k, v, cu.long(), prev, 0.35, False, True)):
        torch.library.opcheck(torch.ops.flowcut.triton_flow_scores_varlen.default, args)
    hidden, cum = torch.randn(24, 8, device=DEVICE), torch.rand(21, device=DEVICE)
    index_map = torch.arange(21, device=DEVICE)
    for keep in ([1, 1, 1], [3, 2, 9], lens):
        args = (hidden, cum, index_map, cu, keep, True)
        torch.library.opcheck(torch.ops.flowcut.triton_select_gather_varlen.default, args)


# --------------------------------------------------------------------------------------------
# GPU only: full shapes, torch.compile


cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("b,h,s,d", [(1, 16, 577, 64), (16, 16, 577, 64), (1, 16, 16384, 80)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_shapes_cuda(b, h, s, d, dtype):
    q, k, v = qkv(b, h, s, d, dtype, seed=0, device="cuda")
    prev = torch.rand(b, s - 1, device="cuda")
    scores = ops.flow_scores(q, k, v, prev, scale=d**-0.5, backend="triton")
    assert_scores_close(scores, reference.flow_scores(q, k, v, prev, d**-0.5, True, True), dtype)
    hidden = torch.randn(b, s, h * d, device="cuda", dtype=dtype)
    index_map = torch.arange(s - 1, device="cuda").repeat(b, 1)
    for keep in (65, s // 2):
        got = ops.select_gather(hidden, scores[0], index_map, keep, backend="triton")
        for x, y in zip(got, reference.select_gather(hidden, scores[0], index_map, keep, True)):
            assert torch.equal(x, y)


@cuda_only
@pytest.mark.parametrize("lens", [[577] * 16, [577, 16384, 1025, 2]])
def test_varlen_full_shapes_cuda(lens):
    """Packed batches at model shapes (CLIP-L images; a long Qwen2-VL-like image among others), both launch
    paths (the size rule's, split here, and the fused one)."""
    h, d = 16, 80
    q, k, v = packed_qkv(lens, h, d, torch.bfloat16, seed=0)
    cu = cu_seqlens(lens)
    prev = torch.rand(sum(lens) - len(lens), device="cuda")
    want = reference.flow_scores_varlen(q, k, v, cu, prev, d**-0.5, True, True)
    hidden = torch.randn(sum(lens), h * d, device="cuda", dtype=torch.bfloat16)
    index_map = torch.arange(sum(lens) - len(lens), device="cuda")
    keep = [min(s, 65) for s in lens]
    for split in (None, False):
        scores = poisoned_scores(k, True, cu)
        tfs.flow_scores_into(q, k, v, prev, d**-0.5, True, True, *scores, cu_seqlens=cu, split=split)
        assert_scores_close(scores, want, torch.bfloat16)
        got = ops.select_gather_varlen(hidden, scores[0], index_map, cu, keep, backend="triton")
        for x, y in zip(got, reference.select_gather_varlen(hidden, scores[0], index_map, cu, keep, True)):
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


@cuda_only
def test_torch_compile_fullgraph_varlen_cuda():
    """The packed ops (called as torch ops: the public wrappers read cu_seqlens on the host) in one graph."""
    lens = [65, 2, 40]
    q, k, v = packed_qkv(lens, 4, 32, torch.float16, seed=0)
    cu = cu_seqlens(lens)
    hidden = torch.randn(sum(lens), 128, device="cuda", dtype=torch.float16)
    index_map = torch.arange(sum(lens) - len(lens), device="cuda")

    def step(q, k, v, cu, hidden, index_map):
        cum, _, _ = torch.ops.flowcut.triton_flow_scores_varlen(q, k, v, cu, None, 0.2, True, True)
        return torch.ops.flowcut.triton_select_gather_varlen(hidden, cum, index_map, cu, [17, 2, 9], True)

    compiled = torch.compile(step, fullgraph=True)
    for x, y in zip(compiled(q, k, v, cu, hidden, index_map), step(q, k, v, cu, hidden, index_map)):
        assert torch.equal(x, y)

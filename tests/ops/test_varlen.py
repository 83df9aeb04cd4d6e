"""The packed (varlen) op surface: a dense batch is its special case, opcheck, and bad input named."""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import FlowCutInputError, ops, reference


def packed(lens=(5, 9, 3), h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(len(lens), h, d, generator=g)
    k, v = torch.randn(2, total, h, d, generator=g)
    return q, k, v, torch.tensor([0, *lens]).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("has_cls", [True, False])
def test_a_dense_batch_is_the_special_case(backend, has_cls):
    """Equal lengths: the packed ops give the dense ops' results, row for row."""
    q, k, v, _ = packed((7, 7, 7))
    cu = torch.tensor([0, 7, 14, 21])
    dense_k, dense_v = (x.view(3, 7, 2, 4).transpose(1, 2) for x in (k, v))
    got = ops.flow_scores_varlen(q, k, v, cu, scale=0.5, has_cls=has_cls, backend=backend)
    want = ops.flow_scores(q, dense_k, dense_v, scale=0.5, has_cls=has_cls, backend=backend)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y.flatten(), rtol=1e-6, atol=1e-7)
    hidden = torch.randn(21, 5)
    out = ops.select_gather_varlen(hidden, got[0], None, cu, [4, 4, 4], has_cls=has_cls, backend=backend)
    dense = ops.select_gather(hidden.view(3, 7, 5), want[0], None, 4, has_cls=has_cls, backend=backend)
    for x, y in zip(out, dense):
        assert torch.equal(x, y.flatten(0, 1) if x.dim() == 2 else y.flatten())
    assert torch.equal(out[3], torch.tensor([0, 4, 8, 12]))


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_opcheck(cu_dtype):
    q, k, v, cu = packed()
    cu = cu.to(cu_dtype)
    cum = reference.flow_scores_varlen(q, k, v, cu, None, 0.5, True, True)[0]
    torch.library.opcheck(torch.ops.flowcut.flow_scores_varlen, (q, k, v, cu, None, 0.5, True, True))
    torch.library.opcheck(torch.ops.flowcut.flow_scores_varlen, (q, k, v, cu, torch.rand(17), 0.5, False, True))
    torch.library.opcheck(
        torch.ops.flowcut.select_gather_varlen, (torch.randn(17, 6), cum, torch.arange(14), cu, [2, 9, 1], True)
    )


def test_prune_counts_are_each_images_own():
    entropy = torch.tensor([0.1, 0.9, 0.5])
    got = ops.prune_counts(entropy, [100, 50, 20], 10, 4)
    assert got == [ops.prune_count(entropy[b : b + 1], n, 10, 4) for b, n in enumerate([100, 50, 20])]
    assert ops.prune_counts(entropy, [100, 50, 20], 10, 0) == [91, 41, 11]


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(FlowCutInputError, match=match):
        fn(*args, **kwargs)


def test_bad_cu_seqlens_and_keep_are_named():
    q, k, v, cu = packed()
    hidden, cum = torch.randn(17, 6), torch.rand(14)
    for fn, args in ((ops.flow_scores_varlen, (q, k, v)), (ops.select_gather_varlen, (hidden, cum, None))):
        extra = dict(scale=1.0) if fn is ops.flow_scores_varlen else dict(keep=[2, 2, 2])
        _raises("cu_seqlens has dtype torch.float32", fn, *args, cu.float(), **extra)
        _raises(r"cu_seqlens must have shape \(B \+ 1,\)", fn, *args, cu[None], **extra)
        _raises("cu_seqlens must start at 0", fn, *args, cu + 1, **extra)
        _raises("cu_seqlens must increase by at least 2", fn, *args, torch.tensor([0, 5, 5, 17]), **extra)
        _raises("cu_seqlens must increase by at least 2", fn, *args, torch.tensor([0, 9, 5, 17]), **extra)
        _raises("cu_seqlens must end at the row count 17, got 16", fn, *args, torch.tensor([0, 5, 14, 16]), **extra)
        _raises("cu_seqlens must hold B", fn, *args, torch.tensor([0]), **extra)
    _raises(r"q_relay must have shape \(B, H, D\) = \(3, 2, 4\)", ops.flow_scores_varlen, q[:2], k, v, cu, scale=1.0)
    _raises(r"prev must have shape \(T_c,\) = \(14,\)", ops.flow_scores_varlen, q, k, v, cu, torch.rand(17), scale=1.0)
    _raises("k must have shape", ops.flow_scores_varlen, q, k[None], v, cu, scale=1.0)
    _raises("scale must be a float", ops.flow_scores_varlen, q, k, v, cu, scale=True)
    _raises(r"keep\[1\]=10 is out of range: it must be \[1, 9\]", ops.select_gather_varlen, hidden, cum, None, cu,
            [2, 10, 2])
    _raises(r"keep\[0\]=0 is out of range", ops.select_gather_varlen, hidden, cum, None, cu, torch.tensor([0, 2, 2]))
    _raises("keep must hold one count per image", ops.select_gather_varlen, hidden, cum, None, cu, [2, 2])
    _raises("keep must be a", ops.select_gather_varlen, hidden, cum, None, cu, torch.tensor([2.0, 2, 2]))
    _raises(r"cum must have shape \(T_c,\) = \(14,\)", ops.select_gather_varlen, hidden, torch.rand(17), None, cu,
            [2, 2, 2])
    _raises("index_map has dtype", ops.select_gather_varlen, hidden, cum, torch.zeros(14, dtype=torch.int32), cu,
            [2, 2, 2])
    _raises(r"n_candidates\[1\]=5 is out of range", ops.prune_counts, torch.rand(2), [100, 5], 10, 2)
    _raises("n_candidates must hold one int per image", ops.prune_counts, torch.rand(2), [100], 10, 2)

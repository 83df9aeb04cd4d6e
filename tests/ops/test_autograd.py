"""Gradients: select_gather (dense and packed) is differentiable in hidden, in every backend; the scores are not."""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import ops

FLOAT64 = [b for b in CPU_BACKENDS if b in ops.available_backends("cpu", dtype=torch.float64)]


def cum_with_ties(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 4).floor()  # few levels: ties decided by the lower index


@pytest.mark.parametrize("backend", FLOAT64)
@pytest.mark.parametrize("has_cls", [True, False])
def test_gradcheck_float64(backend, has_cls):
    hidden = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    cum = cum_with_ties((2, 9 - has_cls))
    assert torch.autograd.gradcheck(lambda h: ops.select_gather(h, cum, None, 5, has_cls=has_cls, backend=backend)[0],
                                    (hidden,))
    packed = torch.randn(17, 3, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    cum = cum_with_ties(17 - 3 * has_cls, seed=1)
    assert torch.autograd.gradcheck(
        lambda h: ops.select_gather_varlen(h, cum, None, cu, [2, 6, 3], has_cls=has_cls, backend=backend)[0],
        (packed,),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_is_the_kept_rows_scattered_back(backend):
    """Every backend (Triton too, in float32): d(hidden) is the output gradient on the kept rows, 0 elsewhere."""
    hidden = torch.randn(2, 9, 3, requires_grad=True)
    cum = cum_with_ties((2, 8))
    out, _, index = ops.select_gather(hidden, cum, None, 4, backend=backend)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    want = torch.zeros_like(hidden)
    for b in range(2):
        want[b, 0] = weight[b, 0]
        want[b, index[b] + 1] = weight[b, 1:]
    assert torch.equal(hidden.grad, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scores_carry_no_gradient(backend):
    q = torch.randn(2, 2, 4, requires_grad=True)
    k = torch.randn(2, 2, 9, 4, requires_grad=True)
    for out in ops.flow_scores(q, k, k, scale=0.5, backend=backend):
        assert not out.requires_grad and out.grad_fn is None
    hidden = torch.randn(2, 9, 3, requires_grad=True)
    out = ops.select_gather(hidden, torch.rand(2, 8), None, 4, backend=backend)
    assert out[0].requires_grad and not out[1].requires_grad and not out[2].requires_grad


def test_opcheck_with_gradients():
    hidden = torch.randn(2, 9, 3, requires_grad=True)
    cum = cum_with_ties((2, 8))
    torch.library.opcheck(torch.ops.flowcut.select_gather, (hidden, cum, torch.arange(8).expand(2, 8), 4, True))
    packed = torch.randn(17, 3, requires_grad=True)
    cu = torch.tensor([0, 5, 14, 17])
    torch.library.opcheck(
        torch.ops.flowcut.select_gather_varlen, (packed, cum_with_ties(14), torch.arange(14), cu, [2, 6, 3], True)
    )
    q, k = torch.randn(2, 2, 4, requires_grad=True), torch.randn(2, 2, 9, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.flowcut.flow_scores, (q, k, k, None, 0.5, True, True))


def test_no_autograd_state_without_grad():
    hidden = torch.randn(2, 9, 3, requires_grad=True)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = ops.select_gather(hidden, torch.rand(2, 8), None, 4)
        assert out[0].grad_fn is None and not out[0].requires_grad

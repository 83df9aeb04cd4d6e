"""Gradients of the ops, the same for every backend (registered when a backend registers).

- ``select_gather`` / ``select_gather_varlen``: differentiable in ``hidden``. The gradient of the kept
  rows goes back to the rows they came from; dropped rows get zero. The rows are found again from
  ``cum`` with the reference's selection, which every backend's selection equals (docs/semantics.md).
- ``flow_scores`` / ``flow_scores_varlen``: not differentiated. The scores only decide which tokens
  stay; they carry no gradient into q, k or v (their gradients are None).
- ``cum`` and ``index_map`` carry no gradient either.
"""

from __future__ import annotations

import torch

from . import reference


def _save_selection(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])  # scores, indices (and offsets) carry no gradient
    hidden, cum, _, *rest = inputs
    ctx.shape, ctx.dtype = hidden.shape, hidden.dtype
    ctx.args = rest  # (keep, has_cls) or (cu_seqlens, keep, has_cls)
    ctx.save_for_backward(cum, *(t for t in rest if isinstance(t, torch.Tensor)))


def _select_gather_backward(ctx, grad_hidden, grad_cum, grad_index):
    cum = ctx.saved_tensors[0]
    keep, has_cls = ctx.args
    rows = reference.kept_rows(cum, keep, has_cls)[1]
    grad = grad_hidden.new_zeros(ctx.shape)
    grad.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, ctx.shape[-1]), grad_hidden)
    return grad, None, None, None, None


def _select_gather_varlen_backward(ctx, grad_hidden, grad_cum, grad_index, grad_cu):
    cum, cu_seqlens = ctx.saved_tensors
    _, keep, has_cls = ctx.args
    rows = reference.kept_rows_varlen(cum, cu_seqlens, keep, has_cls)
    grad = grad_hidden.new_zeros(ctx.shape).index_copy_(0, rows, grad_hidden)
    return grad, None, None, None, None, None


def _no_gradient(ctx, *grads):
    return (None,) * ctx.n_inputs


def _count_inputs(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)
    ctx.n_inputs = len(inputs)


def attach(backend) -> None:
    """Register the gradients of ``backend``'s ops (called by ``register_backend``)."""
    rules = {
        "select_gather": (_select_gather_backward, _save_selection),
        "flow_scores": (_no_gradient, _count_inputs),
        "select_gather_varlen": (_select_gather_varlen_backward, _save_selection),
        "flow_scores_varlen": (_no_gradient, _count_inputs),
    }
    for name, (backward, setup) in rules.items():
        if name in backend.ops:
            torch.library.register_autograd(backend.ops[name]._qualified_op_name, backward, setup_context=setup)

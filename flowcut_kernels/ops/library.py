"""The op schemas of ``torch.ops.flowcut`` with their fake (meta) implementations, in one place.

The reference backend ("torch") is defined here as ``flowcut::flow_scores`` / ``select_gather`` /
``flow_scores_varlen`` / ``select_gather_varlen`` / ``prune_count`` (custom ops over
:mod:`flowcut_kernels.ops.reference`). The other backends register ops of the same signatures
(``triton_*`` in :mod:`flowcut_kernels.ops.triton`, ``native_*`` in ``csrc/ops.cpp``) and reuse the
``*_fake`` functions below, so FakeTensor tracing and ``torch.compile`` see the same output shapes from
every backend.
"""

from typing import Optional

import torch
from torch import Tensor

from . import reference


@torch.library.custom_op("flowcut::flow_scores", mutates_args=())
def _flow_scores_op(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool, semantic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.flow_scores(q_relay, k, v, prev, scale, has_cls, semantic)


@_flow_scores_op.register_fake
def flow_scores_fake(q_relay, k, v, prev, scale, has_cls, semantic):
    """Output shapes of every backend's flow_scores op (for FakeTensor tracing)."""
    batch, _, seq, _ = k.shape
    n = seq - 1 if has_cls else seq
    scores = k.new_empty((batch, n), dtype=torch.float32)
    return scores, k.new_empty((batch,), dtype=torch.float32), torch.empty_like(scores)


@torch.library.custom_op("flowcut::select_gather", mutates_args=())
def _select_gather_op(
    hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int, has_cls: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.select_gather(hidden, cum, index_map, keep, has_cls)


@_select_gather_op.register_fake
def select_gather_fake(hidden, cum, index_map, keep, has_cls):
    """Output shapes of every backend's select_gather op (for FakeTensor tracing)."""
    batch, _, channels = hidden.shape
    n_keep = keep - 1 if has_cls else keep
    return (
        hidden.new_empty((batch, keep, channels)),
        cum.new_empty((batch, n_keep)),
        index_map.new_empty((batch, n_keep)),
    )


@torch.library.custom_op("flowcut::flow_scores_varlen", mutates_args=())
def _flow_scores_varlen_op(
    q_relay: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool,
    semantic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.flow_scores_varlen(q_relay, k, v, cu_seqlens, prev, scale, has_cls, semantic)


@_flow_scores_varlen_op.register_fake
def flow_scores_varlen_fake(q_relay, k, v, cu_seqlens, prev, scale, has_cls, semantic):
    """Output shapes of every backend's flow_scores_varlen op: packed (T_c,), (B,), (T_c,)."""
    batch = q_relay.shape[0]
    scores = k.new_empty((k.shape[0] - batch * int(has_cls),), dtype=torch.float32)
    return scores, k.new_empty((batch,), dtype=torch.float32), torch.empty_like(scores)


@torch.library.custom_op("flowcut::select_gather_varlen", mutates_args=())
def _select_gather_varlen_op(
    hidden: Tensor, cum: Tensor, index_map: Tensor, cu_seqlens: Tensor, keep: list[int], has_cls: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.select_gather_varlen(hidden, cum, index_map, cu_seqlens, keep, has_cls)


@_select_gather_varlen_op.register_fake
def select_gather_varlen_fake(hidden, cum, index_map, cu_seqlens, keep, has_cls):
    """Output shapes of every backend's select_gather_varlen op: (Σ keep, C), (Σ K_b,) twice, (B + 1,)."""
    rows = sum(keep)
    kept = rows - len(keep) * int(has_cls)
    return (
        hidden.new_empty((rows, hidden.shape[1])),
        cum.new_empty((kept,)),
        index_map.new_empty((kept,)),
        torch.empty_like(cu_seqlens),
    )


@torch.library.custom_op("flowcut::prune_count", mutates_args=())
def _prune_count_op(entropy: Tensor, n_candidates: int, target: int, steps_left: int) -> int:
    return reference.prune_count(entropy, n_candidates, target, steps_left)


@_prune_count_op.register_fake
def _(entropy, n_candidates, target, steps_left):
    return torch.library.get_ctx().new_dynamic_size()



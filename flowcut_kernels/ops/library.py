"""The op schemas of ``torch.ops.flowcut`` with their fake (meta) implementations, in one place.

The reference backend ("torch") is defined here as ``flowcut::flow_scores`` / ``select_gather`` /
``flow_scores_varlen`` / ``select_gather_varlen`` / ``prune_count`` (custom ops over
:mod:`flowcut_kernels.ops.reference`). The other backends register ops of the same signatures
(``triton_*`` in :mod:`flowcut_kernels.ops.triton`, ``native_*`` in ``csrc/ops.cpp``) and reuse the
``*_fake`` functions below, so FakeTensor tracing and ``torch.compile`` see the same output shapes from
every backend. Each reference op checks its inputs first (:mod:`.validate`, the checks the public functions
use), so a direct ``torch.ops.flowcut.<op>`` call with bad input names the argument.
"""

from typing import Optional

import torch
from torch import Tensor

from . import reference, validate


@torch.library.custom_op("flowcut::flow_scores", mutates_args=())
def _flow_scores_op(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool, semantic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    validate.flow_scores(q_relay, k, v, prev, scale, has_cls)
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
    validate.select_gather(hidden, cum, index_map, keep, has_cls)
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
    validate.flow_scores_varlen(q_relay, k, v, cu_seqlens, prev, scale, has_cls)
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
    validate.select_gather_varlen(hidden, cum, index_map, cu_seqlens, keep, has_cls)
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


# --- Generic primitives -------------------------------------------------------------------------------------


@torch.library.custom_op("flowcut::attention_scores", mutates_args=())
def _attention_scores_op(
    q: Tensor, k: Tensor, scale: float, key_mask: Optional[Tensor], span_start: int, span_end: int
) -> Tensor:
    validate.attention_scores(q, k, scale, key_mask, span_start, span_end)
    return reference.attention_scores(q, k, scale, key_mask, span_start, span_end)


@_attention_scores_op.register_fake
def attention_scores_fake(q, k, scale, key_mask, span_start, span_end):
    """(B, span_end − span_start) float32."""
    return k.new_empty((k.shape[0], span_end - span_start), dtype=torch.float32)


@torch.library.custom_op("flowcut::text_guided_scores", mutates_args=())
def _text_guided_scores_op(
    q_relay: Tensor, v_relay: Tensor, k: Tensor, v: Tensor, segments: list[int], scale: float
) -> Tensor:
    validate.text_guided_scores(q_relay, v_relay, k, v, segments, scale)
    return reference.text_guided_scores(q_relay, v_relay, k, v, segments, scale)


@_text_guided_scores_op.register_fake
def text_guided_scores_fake(q_relay, v_relay, k, v, segments, scale):
    """(Σ_g (end − start),) float32."""
    total = sum(segments[2::3]) - sum(segments[1::3])
    return k.new_empty((total,), dtype=torch.float32)


@torch.library.custom_op("flowcut::topk_select", mutates_args=())
def _topk_select_op(
    scores: Tensor, cu_seqlens: Tensor, keep: list[int], protect: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.topk_select(scores, cu_seqlens, keep, protect)


@_topk_select_op.register_fake
def topk_select_fake(scores, cu_seqlens, keep, protect):
    """kept (K,), dropped (T − K,) int64 (K data-dependent when rows are protected), offsets (B + 1,) twice."""
    kept = sum(keep) if protect is None else torch.library.get_ctx().new_dynamic_size()
    rows = scores.shape[0]
    return (
        scores.new_empty((kept,), dtype=torch.int64),
        scores.new_empty((rows - kept,), dtype=torch.int64),
        torch.empty_like(cu_seqlens),
        torch.empty_like(cu_seqlens),
    )


@torch.library.custom_op("flowcut::merge_nearest", mutates_args=())
def _merge_nearest_op(
    hidden: Tensor, keys: Tensor, kept: Tensor, dropped: Tensor, kept_cu: Tensor, dropped_cu: Tensor,
    sizes: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    return reference.merge_nearest(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes)


@_merge_nearest_op.register_fake
def merge_nearest_fake(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes):
    """merged (K, C) in hidden's dtype, sizes_out (K,) float32."""
    return hidden.new_empty((kept.shape[0], hidden.shape[1])), hidden.new_empty((kept.shape[0],), dtype=torch.float32)


@torch.library.custom_op("flowcut::prune_count", mutates_args=())
def _prune_count_op(entropy: Tensor, n_candidates: int, target: int, steps_left: int) -> int:
    if steps_left > 0:  # the last step does not read Hn
        entropy = torch.tensor(validate.entropy_on_host(entropy), dtype=torch.float64)
    return reference.prune_count(entropy, n_candidates, target, steps_left)


@_prune_count_op.register_fake
def _(entropy, n_candidates, target, steps_left):
    return torch.library.get_ctx().new_dynamic_size()




#: The fake of each op name, shared by every backend's op of that name.
FAKES = {
    "flow_scores": flow_scores_fake,
    "select_gather": select_gather_fake,
    "flow_scores_varlen": flow_scores_varlen_fake,
    "select_gather_varlen": select_gather_varlen_fake,
    "attention_scores": attention_scores_fake,
    "text_guided_scores": text_guided_scores_fake,
    "topk_select": topk_select_fake,
    "merge_nearest": merge_nearest_fake,
}


def register_fakes(prefix: str) -> None:
    """Give every ``flowcut::<prefix><op>`` that exists the fake of its op name (a backend module calls this once;
    the fakes count as registered from that module, as a C++ library's ``set_python_module`` names it)."""
    for name, fake in FAKES.items():
        if hasattr(torch.ops.flowcut, prefix + name):
            torch.library.register_fake(f"flowcut::{prefix}{name}", fake, _stacklevel=2)

"""Backend "triton": the Triton kernels as torch ops ``flowcut::triton_flow_scores`` / ``triton_select_gather``,
their packed-batch forms ``triton_flow_scores_varlen`` / ``triton_select_gather_varlen`` (the same kernels),
and the generic primitives ``triton_attention_scores`` / ``triton_text_guided_scores`` / ``triton_topk_select``
/ ``triton_merge_nearest``: one module per kernel family (:mod:`.flow_scores`, :mod:`.select_gather`,
:mod:`.attention_scores`, :mod:`.text_guided_scores`, :mod:`.topk_select`, :mod:`.merge_nearest`), with the pieces
they share in :mod:`.dots` and :mod:`.select`.

On a GPU they are ``torch.library.triton_op``s launching through ``wrap_triton``, so torch.compile
sees the kernels. Under the CPU interpreter (``TRITON_INTERPRET=1`` set before import) triton_op
fails fake-tensor checks, so there they are ``custom_op``s with the shared fake implementations,
and the backend also runs on CPU tensors. Inputs: float16, bfloat16 or float32 (k's dtype for
flow_scores, attention_scores and text_guided_scores, the hidden states' for select_gather and
merge_nearest, the scores' for topk_select); float64 goes to another backend. triton_topk_select with
``protect`` reads its kept count on the host (one scalar): its output sizes depend on the data.

Called directly, flow_scores (dense and packed), select_gather, attention_scores and text_guided_scores check
their inputs as the public functions do (:mod:`..validate`; O(1), cu_seqlens is not read on the host).
"""

import os
from typing import Optional

import torch
from torch import Tensor

from .. import validate
from ..backends import Backend, register_backend
from ..library import register_fakes
from . import attention_scores, merge_nearest, text_guided_scores, topk_select
from .flow_scores import flow_scores_into, flow_scores_outputs
from .select_gather import select_gather_into, select_gather_outputs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _flow_scores(q_relay, k, v, cu_seqlens, prev, scale, has_cls, semantic):
    out = flow_scores_outputs(k, has_cls, cu_seqlens)
    flow_scores_into(q_relay, k, v, prev, scale, has_cls, semantic, *out, cu_seqlens=cu_seqlens, wrap=_wrap)
    return out


def _select_gather(hidden, cum, index_map, cu_seqlens, keep, has_cls):
    out = select_gather_outputs(hidden, cum, keep, has_cls, cu_seqlens)
    select_gather_into(hidden, cum, index_map, has_cls, *out, cu_seqlens=cu_seqlens, wrap=_wrap)
    return out


if INTERPRET:  # custom ops that launch the kernels as they are
    _define, _wrap = torch.library.custom_op, (lambda kernel: kernel)
else:
    _define, _wrap = torch.library.triton_op, torch.library.wrap_triton


@_define("flowcut::triton_flow_scores", mutates_args=())
def triton_flow_scores(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool, semantic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    validate.flow_scores(q_relay, k, v, prev, scale, has_cls)
    return _flow_scores(q_relay, k, v, None, prev, scale, has_cls, semantic)


@_define("flowcut::triton_select_gather", mutates_args=())
def triton_select_gather(
    hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int, has_cls: bool
) -> tuple[Tensor, Tensor, Tensor]:
    validate.select_gather(hidden, cum, index_map, keep, has_cls)
    return _select_gather(hidden, cum, index_map, None, keep, has_cls)


@_define("flowcut::triton_flow_scores_varlen", mutates_args=())
def triton_flow_scores_varlen(
    q_relay: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool,
    semantic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    validate.flow_scores_varlen(q_relay, k, v, cu_seqlens, prev, scale, has_cls, read_offsets=False)
    return _flow_scores(q_relay, k, v, cu_seqlens, prev, scale, has_cls, semantic)


@_define("flowcut::triton_select_gather_varlen", mutates_args=())
def triton_select_gather_varlen(
    hidden: Tensor, cum: Tensor, index_map: Tensor, cu_seqlens: Tensor, keep: list[int], has_cls: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _select_gather(hidden, cum, index_map, cu_seqlens, keep, has_cls)


@_define("flowcut::triton_attention_scores", mutates_args=())
def triton_attention_scores(
    q: Tensor, k: Tensor, scale: float, key_mask: Optional[Tensor], span_start: int, span_end: int
) -> Tensor:
    validate.attention_scores(q, k, scale, key_mask, span_start, span_end)
    return attention_scores.attention_scores(q, k, scale, key_mask, span_start, span_end, wrap=_wrap)


@_define("flowcut::triton_text_guided_scores", mutates_args=())
def triton_text_guided_scores(
    q_relay: Tensor, v_relay: Tensor, k: Tensor, v: Tensor, segments: list[int], scale: float
) -> Tensor:
    validate.text_guided_scores(q_relay, v_relay, k, v, segments, scale)
    return text_guided_scores.text_guided_scores(q_relay, v_relay, k, v, segments, scale, wrap=_wrap)


@_define("flowcut::triton_topk_select", mutates_args=())
def triton_topk_select(
    scores: Tensor, cu_seqlens: Tensor, keep: list[int], protect: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return topk_select.topk_select(scores, cu_seqlens, keep, protect, wrap=_wrap)


@_define("flowcut::triton_merge_nearest", mutates_args=())
def triton_merge_nearest(
    hidden: Tensor, keys: Tensor, kept: Tensor, dropped: Tensor, kept_cu: Tensor, dropped_cu: Tensor,
    sizes: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    return merge_nearest.merge_nearest(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes, wrap=_wrap)


if INTERPRET:
    register_fakes("triton_")

register_backend(
    Backend.from_library(
        "triton", "triton_", ("cpu", "cuda") if INTERPRET else ("cuda",), (torch.float16, torch.bfloat16, torch.float32)
    )
)

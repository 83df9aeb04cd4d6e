"""Backend "triton": the Triton kernels as torch ops ``flowcut::triton_flow_scores`` / ``triton_select_gather``
and their packed-batch forms ``triton_flow_scores_varlen`` / ``triton_select_gather_varlen`` (the same kernels).

On a GPU they are ``torch.library.triton_op``s launching through ``wrap_triton``, so torch.compile
sees the kernels. Under the CPU interpreter (``TRITON_INTERPRET=1`` set before import) triton_op
fails fake-tensor checks, so there they are ``custom_op``s with the shared fake implementations,
and the backend also runs on CPU tensors. Inputs: float16, bfloat16 or float32 (k's dtype for
flow_scores, the hidden states' for select_gather); float64 goes to another backend.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from ..backends import Backend, register_backend
from ..library import flow_scores_fake, flow_scores_varlen_fake, select_gather_fake, select_gather_varlen_fake
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
    return _flow_scores(q_relay, k, v, None, prev, scale, has_cls, semantic)


@_define("flowcut::triton_select_gather", mutates_args=())
def triton_select_gather(
    hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int, has_cls: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _select_gather(hidden, cum, index_map, None, keep, has_cls)


@_define("flowcut::triton_flow_scores_varlen", mutates_args=())
def triton_flow_scores_varlen(
    q_relay: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool,
    semantic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _flow_scores(q_relay, k, v, cu_seqlens, prev, scale, has_cls, semantic)


@_define("flowcut::triton_select_gather_varlen", mutates_args=())
def triton_select_gather_varlen(
    hidden: Tensor, cum: Tensor, index_map: Tensor, cu_seqlens: Tensor, keep: list[int], has_cls: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _select_gather(hidden, cum, index_map, cu_seqlens, keep, has_cls)


if INTERPRET:
    triton_flow_scores.register_fake(flow_scores_fake)
    triton_select_gather.register_fake(select_gather_fake)
    triton_flow_scores_varlen.register_fake(flow_scores_varlen_fake)
    triton_select_gather_varlen.register_fake(select_gather_varlen_fake)

register_backend(
    Backend.from_library(
        "triton", "triton_", ("cpu", "cuda") if INTERPRET else ("cuda",), (torch.float16, torch.bfloat16, torch.float32)
    )
)

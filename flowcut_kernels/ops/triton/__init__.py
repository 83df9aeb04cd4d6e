"""Backend "triton": the Triton kernels as torch ops ``flowcut::triton_flow_scores`` / ``triton_select_gather``.

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
from ..library import flow_scores_fake, select_gather_fake
from .flow_scores import flow_scores_into, flow_scores_outputs
from .select_gather import select_gather_into, select_gather_outputs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _flow_scores(q_relay, k, v, prev, scale, has_cls, semantic, wrap):
    out = flow_scores_outputs(k, has_cls)
    flow_scores_into(q_relay, k, v, prev, scale, has_cls, semantic, *out, wrap=wrap)
    return out


def _select_gather(hidden, cum, index_map, keep, has_cls, wrap):
    out = select_gather_outputs(hidden, cum, keep, has_cls)
    select_gather_into(hidden, cum, index_map, keep, has_cls, *out, wrap=wrap)
    return out


if INTERPRET:
    _define = torch.library.custom_op
    _wrap = None
else:
    _define = torch.library.triton_op
    _wrap = torch.library.wrap_triton


@_define("flowcut::triton_flow_scores", mutates_args=())
def triton_flow_scores(
    q_relay: Tensor, k: Tensor, v: Tensor, prev: Optional[Tensor], scale: float, has_cls: bool, semantic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _flow_scores(q_relay, k, v, prev, scale, has_cls, semantic, _wrap or (lambda kernel: kernel))


@_define("flowcut::triton_select_gather", mutates_args=())
def triton_select_gather(
    hidden: Tensor, cum: Tensor, index_map: Tensor, keep: int, has_cls: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _select_gather(hidden, cum, index_map, keep, has_cls, _wrap or (lambda kernel: kernel))


if INTERPRET:
    triton_flow_scores.register_fake(flow_scores_fake)
    triton_select_gather.register_fake(select_gather_fake)

register_backend(
    Backend(
        "triton",
        torch.ops.flowcut.triton_flow_scores,
        torch.ops.flowcut.triton_select_gather,
        ("cpu", "cuda") if INTERPRET else ("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
    )
)

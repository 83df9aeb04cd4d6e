"""Pieces the Triton kernels of attention_scores, text_guided_scores and merge_nearest share: where their dots run in
float32, the (M, K)·(N, K)ᵀ dot, one step of an online softmax, and the head-dim block.

Dots run in the input dtype (fp16/bf16, float32 accumulation) or, for
float32 / mixed dtypes / the CPU interpreter, in float32 with ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_HALF = (torch.float16, torch.bfloat16)


def f32_dot(*tensors: Tensor) -> bool:
    """Whether the kernels' dots run in float32 (ieee): not for same-dtype fp16/bf16 inputs on a GPU."""
    dtypes = {t.dtype for t in tensors}
    return INTERPRET or len(dtypes) != 1 or dtypes.pop() not in _HALF


@triton.jit
def dot_nt(a, b, F32: tl.constexpr):
    """a (M, K) · b (N, K)ᵀ → (M, N) float32."""
    if F32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b))


@triton.jit
def online(m, z, x):
    """One step of an online softmax along axis 1 (x (M, N), −inf excluded): the new (max, Σexp) per row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, z

def block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot takes dimensions >= 16

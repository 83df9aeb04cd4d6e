"""The op surface other libraries build on: checked inputs, a backend choice, torch ops.

``flow_scores``, ``select_gather`` and ``prune_count`` check their inputs, pick a backend
(:mod:`.backends`) and call its torch op (schemas and fakes: :mod:`.library`). Backends: "torch"
(the reference, :mod:`.reference`), "triton" (:mod:`.triton`) and "native" (C++/CUDA from the
compiled ``flowcut_kernels._C``, :mod:`.native`); the optional ones load at import.
"""

import torch
from torch import Tensor

from ..checks import INPUT_DTYPES, FlowCutInputError, check_int, check_same_device, check_tensor, require
from . import library  # noqa: F401 - registers torch.ops.flowcut.flow_scores / select_gather / prune_count
from .backends import (
    BACKENDS, Backend, available_backends, load_optional_backends, mark_unavailable, register_backend, resolve_backend,
)

def flow_scores(
    q_relay: Tensor,
    k: Tensor,
    v: Tensor,
    prev: Tensor | None = None,
    *,
    scale: float,
    has_cls: bool = True,
    semantic: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's FlowCut scores (docs/semantics.md signals 1–7).

    Args:
        q_relay: (B, H, D) relay query: the CLS row's q (CLS variant) or the mean q over the
            image's S tokens (mean variant). float16/bfloat16/float32/float64.
        k, v: (B, H, S, D) the layer's keys and values, same dtype (float64: "torch" and "native"
            only; "auto" picks one); transposed views are fine.
        prev: (B, N) float32 cumulative score from the previous scored layer (its ``cum``, gathered by
            :func:`select_gather` if tokens were dropped since), or None to start it (first scored layer).
        scale: the model's attention scale (D^-1/2 for CLIP and SigLIP).
        has_cls: True for the CLS variant (row 0 is the relay, N = S − 1), False for the mean
            variant (N = S).
        semantic: add the CLS-value similarity term of the CLS variant; ignored when has_cls is
            False (the mean variant has no semantic term). Without it the CLS-variant layer score
            is (A / ΣA) · ρ.
        backend: "auto" (fastest available for the tensors' device and dtype) or a name from
            :func:`available_backends`.

    Returns:
        (cum, entropy, attn): the new cumulative score (B, N) float32, the normalised entropy
        Hn (B,) float32 and the head-mean relay attention A (B, N) float32.
    """
    check_tensor("q_relay", q_relay, 3, INPUT_DTYPES, "(B, H, D)")
    check_tensor("k", k, 4, INPUT_DTYPES, "(B, H, S, D)")
    check_tensor("v", v, 4, INPUT_DTYPES, "(B, H, S, D)")
    require(
        k.shape == v.shape, f"k and v must have the same shape (B, H, S, D), got {tuple(k.shape)} and {tuple(v.shape)}"
    )
    require(k.dtype == v.dtype, f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    batch, heads, seq, dim = k.shape
    require(
        q_relay.shape == (batch, heads, dim),
        f"q_relay must have shape (B, H, D) = {(batch, heads, dim)} to match k, got {tuple(q_relay.shape)}",
    )
    n = seq - 1 if has_cls else seq
    require(n >= 1, f"k has S={seq} tokens: the CLS variant needs at least one candidate besides the relay (S >= 2)")
    if prev is not None:
        check_tensor("prev", prev, 2, (torch.float32,), "(B, N)")
        require(
            prev.shape == (batch, n),
            f"prev must have shape (B, N) = {(batch, n)} (N = S{' - 1' if has_cls else ''}), got {tuple(prev.shape)}",
        )
    device = check_same_device(q_relay=q_relay, k=k, v=v, prev=prev)
    require(
        isinstance(scale, (int, float)) and not isinstance(scale, bool),
        f"scale must be a float (the attention scale, e.g. head_dim ** -0.5), got {type(scale).__name__}",
    )
    op = BACKENDS[resolve_backend(backend, device, k.dtype)].flow_scores
    return op(q_relay, k, v, prev, float(scale), bool(has_cls), bool(semantic))


def select_gather(
    hidden: Tensor,
    cum: Tensor,
    index_map: Tensor | None,
    keep: int,
    *,
    has_cls: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the top-scoring tokens (ties: lower index first) in their original order, and gather.

    Args:
        hidden: (B, S, C) hidden states, the relay (CLS) row first when ``has_cls``.
        cum: (B, N) float32 cumulative scores of the candidates (N = S − 1 with CLS, else S).
        index_map: (B, N) int64 original patch index of each candidate, or None for the identity
            (0 … N − 1: the first prune step of an image); later steps pass the index_out of the last.
        keep: rows to keep, 1 ≤ keep ≤ S; it counts the relay row when ``has_cls``.
        backend: "auto" or a name from :func:`available_backends`.

    Returns:
        hidden_out (B, keep, C) with the relay row first, cum_out and index_out (B, keep − 1)
        (CLS variant) or (B, keep), kept tokens in ascending original order.
    """
    check_tensor("hidden", hidden, 3, INPUT_DTYPES, "(B, S, C)")
    check_tensor("cum", cum, 2, (torch.float32,), "(B, N)")
    batch, seq, _ = hidden.shape
    n = seq - 1 if has_cls else seq
    if index_map is None:
        index_map = torch.arange(n, device=cum.device).expand(batch, n)
    check_tensor("index_map", index_map, 2, (torch.int64,), "(B, N)")
    for name, t in (("cum", cum), ("index_map", index_map)):
        require(
            t.shape == (batch, n),
            f"{name} must have shape (B, N) = {(batch, n)} for hidden of shape {tuple(hidden.shape)}, "
            f"got {tuple(t.shape)}",
        )
    keep = check_int("keep", keep, 1, seq)
    device = check_same_device(hidden=hidden, cum=cum, index_map=index_map)
    op = BACKENDS[resolve_backend(backend, device, hidden.dtype)].select_gather
    return op(hidden, cum, index_map, keep, bool(has_cls))


def prune_count(entropy: Tensor, n_candidates: int, target: int, steps_left: int) -> int:
    """Tokens to drop at a prune step (the schedule rule of docs/semantics.md).

    Args:
        entropy: (B,) normalised entropies Hn of this layer, one per image (a tensor, or floats).
        n_candidates: N, candidates in the current layer.
        target: T, the final keep target, relay row included (target_num + 1 in the CLS variant).
        steps_left: rpl, prune steps left after this one; 0 means this step goes to T.

    Returns:
        N − (T − 1) when steps_left is 0, else round_half_to_even(max_b (N − (T − 1)) / √rpl · (1 − Hn_b²)).
        The step then keeps max(S − prune, T) rows. Reads Hn on the host (one sync).
    """
    if isinstance(entropy, (float, list, tuple)):
        entropy = torch.tensor(entropy, dtype=torch.float64).reshape(-1)
    check_tensor("entropy", entropy, 1, INPUT_DTYPES, "(B,)")
    require(entropy.numel() >= 1, "entropy must hold one value per image, got an empty tensor")
    target = check_int("target", target, 1)
    n_candidates = check_int("n_candidates", n_candidates, max(target - 1, 1))
    steps_left = check_int("steps_left", steps_left, 0)
    return torch.ops.flowcut.prune_count(entropy, n_candidates, target, steps_left)


__all__ = [
    "Backend",
    "FlowCutInputError",
    "available_backends",
    "register_backend",
    "flow_scores",
    "prune_count",
    "resolve_backend",
    "select_gather",
]

load_optional_backends()

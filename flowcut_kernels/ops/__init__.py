"""The op surface other libraries build on: checked inputs, a backend choice, torch ops.

FlowCut's ops (here): ``flow_scores``, ``select_gather``, ``prune_count`` and the packed-batch
``flow_scores_varlen``, ``select_gather_varlen``, ``prune_counts``. Generic primitives
(:mod:`.primitives`): ``topk_select``, ``gather_rows``, ``merge_nearest``, ``attention_scores``,
``text_guided_scores``. Each function checks its inputs, picks a backend
(:mod:`.backends`) and call its torch op (schemas and fakes: :mod:`.library`). Backends: "torch"
(the reference, :mod:`.reference`), "triton" (:mod:`.triton`) and "native" (C++/CUDA from the
compiled ``flowcut_kernels._C``, :mod:`.native`); the optional ones load at import.
"""

import torch
from torch import Tensor

from ..checks import INPUT_DTYPES, FlowCutInputError, check_int, check_same_device, check_tensor, require
from . import library, reference  # noqa: F401 - registers torch.ops.flowcut.flow_scores / select_gather / prune_count
from .backends import (
    BACKENDS, Backend, available_backends, load_optional_backends, register_backend, resolve_backend,
)
from .primitives import Selection, attention_scores, gather_rows, merge_nearest, text_guided_scores, topk_select

def _check_scale(scale) -> None:
    require(
        isinstance(scale, (int, float)) and not isinstance(scale, bool),
        f"scale must be a float (the attention scale, e.g. head_dim ** -0.5), got {type(scale).__name__}",
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
    _check_scale(scale)
    op = BACKENDS[resolve_backend(backend, device, k.dtype, "flow_scores")].ops["flow_scores"]
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
    op = BACKENDS[resolve_backend(backend, device, hidden.dtype, "select_gather")].ops["select_gather"]
    return op(hidden, cum, index_map, keep, bool(has_cls))


def _check_cu_seqlens(cu_seqlens: Tensor, rows: int, min_len: int) -> list[int]:
    """cu_seqlens (B + 1,) int32/int64: 0, increasing by at least ``min_len``, ending at ``rows``; its values."""
    check_tensor("cu_seqlens", cu_seqlens, 1, (torch.int32, torch.int64), "(B + 1,)")
    require(cu_seqlens.numel() >= 2, "cu_seqlens must hold B + 1 >= 2 offsets (0, then each image's end row)")
    cu = cu_seqlens.tolist()  # one small device-to-host copy
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    require(cu[0] == 0, f"cu_seqlens must start at 0, got {cu[0]}")
    require(
        min(lengths) >= min_len,
        f"cu_seqlens must increase by at least {min_len} per image (each image needs "
        f"{'a relay row and a candidate' if min_len > 1 else 'a row'}), got image lengths {lengths}",
    )
    require(cu[-1] == rows, f"cu_seqlens must end at the row count {rows}, got {cu[-1]}")
    return lengths


def flow_scores_varlen(
    q_relay: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    prev: Tensor | None = None,
    *,
    scale: float,
    has_cls: bool = True,
    semantic: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`flow_scores` for a packed batch: each image's formulas on its own segment (docs/semantics.md).

    Args:
        q_relay: (B, H, D) each image's relay query.
        k, v: (T, H, D) keys and values of all images along one token axis (as flash-attention's varlen
            functions and Qwen2-VL's vision tower hold them); image b is rows cu_seqlens[b] … cu_seqlens[b+1].
            Any strides.
        cu_seqlens: (B + 1,) int32 or int64 offsets: 0, increasing, ending at T.
        prev: (T_c,) float32 packed cumulative scores of the candidates, or None to start them. T_c = T − B
            in the CLS variant (row 0 of each image is its relay), T in the mean variant.
        scale, has_cls, semantic, backend: as for :func:`flow_scores`.

    Returns:
        cum (T_c,) float32 packed like the candidates, entropy (B,) float32, attn (T_c,) float32.
    """
    check_tensor("q_relay", q_relay, 3, INPUT_DTYPES, "(B, H, D)")
    check_tensor("k", k, 3, INPUT_DTYPES, "(T, H, D)")
    check_tensor("v", v, 3, INPUT_DTYPES, "(T, H, D)")
    require(k.shape == v.shape, f"k and v must have one shape (T, H, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    require(k.dtype == v.dtype, f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    device = check_same_device(q_relay=q_relay, k=k, v=v, cu_seqlens=cu_seqlens, prev=prev)
    lengths = _check_cu_seqlens(cu_seqlens, k.shape[0], 2 if has_cls else 1)
    _, heads, dim = k.shape
    require(
        q_relay.shape == (len(lengths), heads, dim),
        f"q_relay must have shape (B, H, D) = {(len(lengths), heads, dim)} for {len(lengths)} images in cu_seqlens "
        f"and k of shape {tuple(k.shape)}, got {tuple(q_relay.shape)}",
    )
    n = k.shape[0] - len(lengths) * int(has_cls)
    if prev is not None:
        check_tensor("prev", prev, 1, (torch.float32,), "(T_c,)")
        require(prev.shape == (n,), f"prev must have shape (T_c,) = ({n},), got {tuple(prev.shape)}")
    _check_scale(scale)
    op = BACKENDS[resolve_backend(backend, device, k.dtype, "flow_scores_varlen")].ops["flow_scores_varlen"]
    return op(q_relay, k, v, cu_seqlens, prev, float(scale), bool(has_cls), bool(semantic))


def select_gather_varlen(
    hidden: Tensor,
    cum: Tensor,
    index_map: Tensor | None,
    cu_seqlens: Tensor,
    keep,
    *,
    has_cls: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`select_gather` for a packed batch, each image with its own keep count.

    Args:
        hidden: (T, C) rows of all images, packed by cu_seqlens; the relay row first in each image (CLS).
        cum: (T_c,) float32 packed candidate scores (from :func:`flow_scores_varlen`).
        index_map: (T_c,) int64 original patch index of each candidate, or None for each image's 0 … N_b − 1.
        cu_seqlens: (B + 1,) int32/int64 offsets of hidden's images.
        keep: (B,) integer tensor or B ints: rows to keep per image, 1 ≤ keep_b ≤ S_b (relay row included).

    Returns:
        hidden_out (Σ keep, C), cum_out and index_out (Σ K_b,) packed (K_b = keep_b − 1 with CLS), and
        cu_seqlens_out (B + 1,) of hidden_out, in cu_seqlens' dtype; kept rows in ascending original order.
    """
    check_tensor("hidden", hidden, 2, INPUT_DTYPES, "(T, C)")
    check_tensor("cum", cum, 1, (torch.float32,), "(T_c,)")
    device = check_same_device(hidden=hidden, cum=cum, index_map=index_map, cu_seqlens=cu_seqlens)
    lengths = _check_cu_seqlens(cu_seqlens, hidden.shape[0], 2 if has_cls else 1)
    n = hidden.shape[0] - len(lengths) * int(has_cls)
    require(cum.shape == (n,), f"cum must have shape (T_c,) = ({n},) for hidden of shape {tuple(hidden.shape)}, "
                               f"got {tuple(cum.shape)}")
    if index_map is None:
        index_map = torch.cat([torch.arange(s - int(has_cls), device=device) for s in lengths])
    check_tensor("index_map", index_map, 1, (torch.int64,), "(T_c,)")
    require(index_map.shape == (n,), f"index_map must have shape (T_c,) = ({n},), got {tuple(index_map.shape)}")
    if isinstance(keep, Tensor):
        require(keep.dim() == 1 and not keep.is_floating_point() and not keep.is_complex(),
                f"keep must be a (B,) integer tensor or a sequence of B ints, got a {keep.dtype} tensor of shape "
                f"{tuple(keep.shape)}")
        keep = keep.tolist()
    require(isinstance(keep, (list, tuple)) and len(keep) == len(lengths),
            f"keep must hold one count per image ({len(lengths)}), got {keep!r}")
    keep = [check_int(f"keep[{b}]", x, 1, s) for b, (x, s) in enumerate(zip(keep, lengths))]
    op = BACKENDS[resolve_backend(backend, device, hidden.dtype, "select_gather_varlen")].ops["select_gather_varlen"]
    return op(hidden, cum, index_map, cu_seqlens, keep, bool(has_cls))


def prune_counts(entropy: Tensor, n_candidates, target: int, steps_left: int) -> list[int]:
    """:func:`prune_count` of each image alone (per-image schedules): B ints, from one host read of Hn.

    Args:
        entropy: (B,) normalised entropies, one per image.
        n_candidates: B ints, each image's current candidates.
        target, steps_left: as for :func:`prune_count` (the same for every image).
    """
    check_tensor("entropy", entropy, 1, INPUT_DTYPES, "(B,)")
    require(
        isinstance(n_candidates, (list, tuple)) and len(n_candidates) == entropy.numel(),
        f"n_candidates must hold one int per image ({entropy.numel()}), got {n_candidates!r}",
    )
    target = check_int("target", target, 1)
    n_candidates = [check_int(f"n_candidates[{b}]", n, max(target - 1, 1)) for b, n in enumerate(n_candidates)]
    steps_left = check_int("steps_left", steps_left, 0)
    return reference.prune_counts(entropy, n_candidates, target, steps_left)


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
    "Selection",
    "attention_scores",
    "available_backends",
    "gather_rows",
    "merge_nearest",
    "text_guided_scores",
    "topk_select",
    "flow_scores",
    "flow_scores_varlen",
    "prune_count",
    "prune_counts",
    "register_backend",
    "resolve_backend",
    "select_gather",
    "select_gather_varlen",
]

load_optional_backends()

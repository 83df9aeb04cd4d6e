"""FlowCut's ops: checked inputs (:mod:`.validate`), a backend choice (:func:`.backends.op_for`, cached per
backend, device type, dtype and op), the backend's torch op.

``flow_scores``, ``select_gather``, ``prune_count`` and the packed-batch ``flow_scores_varlen``,
``select_gather_varlen``, ``prune_counts``. The checks are O(1) Python on shapes, dtypes and devices (the packed ops
read cu_seqlens' B + 1 offsets once); the package's own loops, which build their inputs themselves, call
:func:`.backends.unchecked` instead.
"""

import torch
from torch import Tensor

from ..checks import INPUT_DTYPES, check_int, check_tensor, require
from . import reference, validate
from .backends import op_for


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
            image's S tokens (mean variant). In k's dtype, or float32 (float64 for float64 k): a float32 mean of
            fp16/bf16 queries is fine; a relay of lower precision than k is refused.
        k, v: (B, H, S, D) the layer's keys and values, same dtype (float64: "torch" and "native"
            only; "auto" picks one); transposed views are fine.
        prev: (B, N) float32 cumulative score from the previous scored layer (its ``cum``, gathered by
            :func:`select_gather` if tokens were dropped since), or None to start it (first scored layer).
        scale: the model's attention scale (D^-1/2 for CLIP and SigLIP): a finite float > 0.
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
    device, scale = validate.flow_scores(q_relay, k, v, prev, scale, has_cls)
    op = op_for("flow_scores", backend, device, k.dtype)
    return op(q_relay, k, v, prev, scale, bool(has_cls), bool(semantic))


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
    device, keep, index_map = validate.select_gather(hidden, cum, index_map, keep, has_cls)
    op = op_for("select_gather", backend, device, hidden.dtype)
    return op(hidden, cum, index_map, keep, bool(has_cls))


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
    device, _, scale = validate.flow_scores_varlen(q_relay, k, v, cu_seqlens, prev, scale, has_cls)
    op = op_for("flow_scores_varlen", backend, device, k.dtype)
    return op(q_relay, k, v, cu_seqlens, prev, scale, bool(has_cls), bool(semantic))


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
    device, keep, index_map = validate.select_gather_varlen(hidden, cum, index_map, cu_seqlens, keep, has_cls)
    op = op_for("select_gather_varlen", backend, device, hidden.dtype)
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
    if steps_left > 0:  # the last step does not read Hn
        entropy = validate.entropy_on_host(entropy)
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
        The step then keeps max(S − prune, T) rows. Reads Hn on the host (one sync) unless steps_left is 0;
        a NaN or infinite Hn it reads is a FlowCutInputError naming ``entropy``.
    """
    if isinstance(entropy, (float, list, tuple)):
        entropy = torch.tensor(entropy, dtype=torch.float64).reshape(-1)
    check_tensor("entropy", entropy, 1, INPUT_DTYPES, "(B,)")
    require(entropy.numel() >= 1, "entropy must hold one value per image, got an empty tensor")
    target = check_int("target", target, 1)
    n_candidates = check_int("n_candidates", n_candidates, max(target - 1, 1))
    steps_left = check_int("steps_left", steps_left, 0)
    return torch.ops.flowcut.prune_count(entropy, n_candidates, target, steps_left)

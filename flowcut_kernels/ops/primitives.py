"""Generic token-pruning primitives other methods build on (VisionZip, FastV, ToMe-style merges, your own).

Every function checks its inputs, picks a backend that has the op for the tensors' device and dtype, and
calls the torch op ``torch.ops.flowcut.<name>`` of that backend (schemas and fakes: :mod:`.library`,
definitions: :mod:`.reference`). Batches are packed (``cu_seqlens``) or dense (a (B, N) tensor, every image
the same length); per-image counts are B host ints or a (B,) tensor.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import INPUT_DTYPES, check_int, check_same_device, check_tensor, fail, require
from . import validate
from .backends import op_for


_DENSE_OFFSETS: dict[tuple[int, int, torch.device], Tensor] = {}


def _dense_offsets(batch: int, n: int, device: torch.device) -> Tensor:
    """(B + 1,) int64 offsets 0, N, 2N, … of a dense batch. Eager calls reuse one read-only tensor per (B, N,
    device), the first 64 such shapes (the ops never write it; it is only ever an op input, so an inference-mode one
    serves outside that mode too; kept for good, so no stream can still be reading a freed one); traced calls and
    CUDA-graph captures (whose kernels have not run yet) build it afresh."""
    if torch.compiler.is_compiling():
        return torch.arange(0, (batch + 1) * n, n, device=device, dtype=torch.int64)
    key = (batch, n, device)
    cu = _DENSE_OFFSETS.get(key)
    if cu is None:
        cu = torch.arange(0, (batch + 1) * n, n, device=device, dtype=torch.int64)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if type(cu) is Tensor and not capturing and len(_DENSE_OFFSETS) < 64:  # not a fake or subclass tensor
            _DENSE_OFFSETS[key] = cu
    return cu


def _packed(name: str, x: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor, list[int]]:
    """A dense (B, N, …) or packed (T, …) input as packed rows, offsets and per-image lengths (packed: one small
    host read of the offsets)."""
    if cu_seqlens is None:
        batch, n = x.shape[:2]
        return x.flatten(0, 1), _dense_offsets(batch, n, x.device), [n] * batch
    return x, cu_seqlens, validate.cu_seqlens_lengths(cu_seqlens, x.shape[0], 0)


def _keep_counts(keep, highs: list[int]) -> list[int]:
    """topk_select's ``keep`` (an int for every image, B ints or a (B,) tensor) as B checked counts."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        keep = [keep] * len(highs)
    return validate.counts("keep", keep, len(highs), 0, highs)


@dataclass
class Selection:
    """Which rows stay and which go, per image, in ascending order.

    Dense input (B, N): kept (B, K) and dropped (B, N − K) row indices 0 … N − 1 of each image (every image
    must keep the same count). Packed input: kept (Σ K_b,) and dropped (Σ M_b,) indices into the T rows,
    grouped by image with offsets kept_cu / dropped_cu (B + 1,). ``shape``: the scores' shape. ``mask`` marks the
    kept rows, shaped like the scores (built on first use).
    """

    kept: Tensor
    dropped: Tensor
    kept_cu: Tensor
    dropped_cu: Tensor
    shape: tuple[int, ...]

    @functools.cached_property
    def mask(self) -> Tensor:
        """(B, N) or (T,) bool: True at the kept rows."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.kept.device)
        if len(self.shape) == 2:
            return mask.scatter_(1, self.kept, True)
        mask[self.kept] = True
        return mask


def topk_select(
    scores: Tensor,
    keep,
    *,
    protect: Tensor | None = None,
    span: tuple[int, int] | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> Selection:
    """Keep, per image, the ``keep`` best-scoring rows among the unprotected ones, plus every protected row.

    Args:
        scores: (B, N) or packed (T,) with ``cu_seqlens``; any float dtype (compared in that dtype). Ties keep
            the lower index; NaN ranks above every number.
        keep: unprotected rows to keep per image: an int, B ints, or a (B,) integer tensor.
        protect: bool, shaped like scores: rows always kept, not counted in ``keep`` (text tokens, a CLS row).
        span: (start, end): only rows start … end − 1 of each image compete; the others are protected (dense
            scores only; combine with ``protect`` for more).
        cu_seqlens: (B + 1,) int32/int64 offsets of a packed batch, or None for dense scores.

    Returns:
        A :class:`Selection`.
    """
    if not (isinstance(scores, Tensor) and scores.is_floating_point()):
        fail(f"scores must be a floating tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    dense, shape = cu_seqlens is None, scores.shape
    if len(shape) != (2 if dense else 1):
        fail(f"scores must have shape {'(B, N)' if dense else '(T,) with cu_seqlens'}, got {tuple(shape)}")
    if dense:
        batch, n = shape
    if dense and protect is None and span is None:  # the common call: one device, every row competes
        device = scores.device
        flat, cu, highs = scores.reshape(-1), _dense_offsets(batch, n, device), [n] * batch
        keep = [keep] * batch if type(keep) is int and 0 <= keep <= n else _keep_counts(keep, highs)
    else:
        device = check_same_device(scores=scores, protect=protect, cu_seqlens=cu_seqlens)
        if span is not None:
            require(dense, "span applies to dense (B, N) scores; for packed scores pass protect")
            start, end = span
            require(0 <= start < end <= n, f"span={span} must satisfy 0 <= start < end <= N = {n}")
            outside = torch.ones(n, dtype=torch.bool, device=device)
            outside[start:end] = False
            protect = outside.expand_as(scores) if protect is None else protect | outside
        flat, cu, highs = _packed("scores", scores, cu_seqlens)
        if protect is not None:
            check_tensor("protect", protect, scores.dim(), (torch.bool,), "like scores")
            require(protect.shape == scores.shape, f"protect must have the shape of scores {tuple(scores.shape)}, "
                                                   f"got {tuple(protect.shape)}")
            highs = [int(f.sum()) for f in (~protect).flatten().split(highs)]  # one host read
            protect = protect.flatten()
        keep = _keep_counts(keep, highs)
    op = op_for("topk_select", backend, device, scores.dtype)
    kept, dropped, kept_cu, dropped_cu = op(flat, cu, keep, protect)
    if dense:
        if protect is not None:  # without protected rows every image keeps its count: nothing to read back
            totals = (kept_cu[1:] - kept_cu[:-1]).tolist()
            if len(set(totals)) != 1:
                fail(f"the images keep different numbers of rows {totals} (their protected counts differ): pass "
                     f"packed scores with cu_seqlens to get them")
        if batch == 1:  # indexing is the cheapest view at the B = 1 a launch-bound caller runs
            kept, dropped = kept[None], dropped[None]
        else:  # packed row t of image b is row t − b·n of it
            offsets = _dense_offsets(batch, n, device)[:-1, None]
            kept, dropped = kept.view(batch, -1) - offsets, dropped.view(batch, -1) - offsets
        return Selection(kept, dropped, kept_cu, dropped_cu, (batch, n))
    return Selection(kept, dropped, kept_cu, dropped_cu, tuple(shape))


def gather_rows(hidden: Tensor, rows: Tensor) -> Tensor:
    """hidden (B, N, C) and rows (B, K) → (B, K, C); packed: hidden (T, C), rows (K,) → (K, C)."""
    if rows.dim() == 1:
        return hidden[rows]
    return hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def merge_nearest(
    hidden: Tensor,
    keys: Tensor,
    selection: Selection,
    *,
    sizes: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Merge each image's dropped rows into its most similar kept row (cosine of ``keys``), size-weighted.

    Args:
        hidden: (B, N, C) or packed (T, C), the rows a :func:`topk_select` selection indexes.
        keys: (B, N, Ck) / (T, Ck): what similarity is measured on (the layer's keys, or hidden itself).
        selection: from :func:`topk_select` on the same layout.
        sizes: (B, N) / (T,) how many original tokens each row stands for (ToMe's size), or None for 1 each
            (then the merge is a plain mean).

    Returns:
        merged (B, K, C) / (K, C) — for kept row i, (s_i·h_i + Σ_{j→i} s_j·h_j) / (s_i + Σ_{j→i} s_j), j → i
        when i is the most similar kept row of j's image (ties: lower index) — and its sizes (B, K) / (K,) float32.
    """
    dense = selection.kept.dim() == 2
    check_tensor("hidden", hidden, 3 if dense else 2, INPUT_DTYPES, "(B, N, C)" if dense else "(T, C)")
    check_tensor("keys", keys, hidden.dim(), INPUT_DTYPES, "(B, N, Ck)" if dense else "(T, Ck)")
    if keys.shape[:-1] != hidden.shape[:-1]:
        fail(f"keys must have hidden's rows {tuple(hidden.shape[:-1])}, got {tuple(keys.shape)}")
    device = check_same_device(hidden=hidden, keys=keys, kept=selection.kept, sizes=sizes)
    if sizes is not None:
        require(isinstance(sizes, Tensor) and sizes.shape == hidden.shape[:-1] and sizes.is_floating_point(),
                f"sizes must be a float tensor of shape {tuple(hidden.shape[:-1])}")
    kept, dropped = selection.kept, selection.dropped
    empty = (selection.kept_cu[1:] == selection.kept_cu[:-1]) & (selection.dropped_cu[1:] > selection.dropped_cu[:-1])
    require(not bool(empty.any()), "an image has dropped rows but keeps none: they have nowhere to merge")
    if dense:
        batch, n = hidden.shape[:2]
        offsets = (torch.arange(batch, device=device) * n)[:, None]
        kept, dropped = (kept + offsets).flatten(), (dropped + offsets).flatten()
        hidden, keys = hidden.flatten(0, 1), keys.flatten(0, 1)
        sizes = None if sizes is None else sizes.flatten()
    op = op_for("merge_nearest", backend, device, hidden.dtype)
    merged, size_out = op(hidden, keys, kept, dropped, selection.kept_cu, selection.dropped_cu, sizes)
    if dense:
        return merged.view(batch, -1, merged.shape[-1]), size_out.view(batch, -1)
    return merged, size_out


def attention_scores(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    key_mask: Tensor | None = None,
    span: tuple[int, int] | None = None,
    backend: str = "auto",
) -> Tensor:
    """How much the given query rows attend to each key: head- and row-mean softmax attention, a span of it.

    Args:
        q: (B, Hq, Q, D) any query rows (a CLS row, the last prompt token, all text tokens), as the layer's
            attention uses them (after RoPE).
        k: (B, Hkv, S, D) the layer's keys; Hq a multiple of Hkv (grouped-query attention: query head h reads
            key head h // (Hq / Hkv), as the model does — no need to repeat k).
        scale: the attention scale (D^-1/2).
        key_mask: (B, S) bool, False for keys no query may attend (padding), or None. No causal mask is
            applied: pass rows that see every key (the last token), or mask the keys yourself.
        span: (start, end) of the key columns to return (e.g. an image's tokens), default all.

    Returns:
        (B, end − start) float32: mean over heads and query rows of softmax over all S keys of scale·q·k.
    """
    check_tensor("k", k, 4, INPUT_DTYPES, "(B, Hkv, S, D)")
    start, end = span if span is not None else (0, k.shape[2])
    device, scale = validate.attention_scores(q, k, scale, key_mask, start, end)
    if key_mask is not None:
        require(bool(key_mask.any(dim=1).all()), "key_mask leaves an image without any key to attend")
    op = op_for("attention_scores", backend, device, k.dtype)
    return op(q, k, scale, key_mask, int(start), int(end))


def text_guided_scores(
    q_relay: Tensor,
    v_relay: Tensor,
    k: Tensor,
    v: Tensor,
    segments,
    *,
    scale: float,
    backend: str = "auto",
) -> Tensor:
    """The language-model stage's text-guided score of each image's visual tokens (docs/semantics.md).

    Args:
        q_relay: (B, Hq, D) the relay token's query (the prompt's last token) after RoPE.
        v_relay: (B, Hkv, D) its value.
        k, v: (B, Hkv, S, D) the decoder layer's keys (after RoPE) and values; GQA as in :func:`attention_scores`.
        segments: (b, start, end) triples: image tokens start … end − 1 of sequence b, one per image.
        scale: 1/√D.

    Returns:
        (Σ (end − start),) float32, segment by segment: (rel + sem)·ρ, rel and sem the head-mean softmaxes over
        the segment of scale·q_t·k_j and scale·v_t·v_j, ρ the L1 norm of the head-mean value.
    """
    flat = []
    for g, segment in enumerate(segments):
        if len(segment) != 3:
            fail(f"segments[{g}] must be (b, start, end), got {segment!r}")
        name = f"segments[{g}]"
        flat += [check_int(name, x, 0) for x in segment]
    device, scale = validate.text_guided_scores(q_relay, v_relay, k, v, flat, scale)
    op = op_for("text_guided_scores", backend, device, k.dtype)
    return op(q_relay, v_relay, k, v, flat, scale)

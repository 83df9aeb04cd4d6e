"""The ops' input checks, in one place: the public functions of :mod:`flowcut_kernels.ops` call them, and so do
the reference ("torch") and Triton torch ops, so a direct ``torch.ops.flowcut.<op>(...)`` call with bad input
fails the same way (a :class:`~flowcut_kernels.checks.FlowCutInputError` naming the argument and the fix) instead
of deep inside an einsum or a kernel. The native ops check in C++ (csrc/ops.cpp).

Every check is O(1) Python on shapes, dtypes, devices and Python numbers, and builds its message only when it
fails; none reads tensor data, except :func:`cu_seqlens_lengths` (one small host read of the B + 1 offsets), which
the callers that read them anyway use, and :func:`entropy_on_host` (the prune count's one read).

Dtypes: k and v share one dtype; a relay (``q_relay``, ``v_relay``) or query rows (``q``) come in k's dtype or in
the dtype the ops accumulate in (float32, or float64 for float64 k: the mean variant's relay is a float32 mean
of half-precision queries). Anything else (a float16 relay with float32 keys, float32 with float64 keys) would
be silently rounded or promoted, and is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import INPUT_DTYPES, check_int, check_same_device, check_tensor, fail


#: The dtype the ops accumulate in, per input dtype.
_ACCUMULATES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
                torch.float64: torch.float64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_scale(scale) -> float:
    """The attention scale: a Python int or float, finite and > 0 (0 would make every softmax uniform, a negative
    one reverses the ranking, NaN and inf give NaN scores); returned as a float."""
    if type(scale) is not float and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        fail(f"scale must be a float (the attention scale, e.g. head_dim ** -0.5), got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        fail(f"scale={scale!r} is not an attention scale: it must be a finite float > 0 (e.g. head_dim ** -0.5)")
    return float(scale)


def check_relay_dtype(name: str, x: Tensor, k: Tensor) -> None:
    """``x`` (a relay or query rows) in k's dtype or in the ops' accumulation dtype for k."""
    dtype, kd = x.dtype, k.dtype
    if dtype is not kd and dtype is not _ACCUMULATES.get(kd):
        allowed = torch.promote_types(kd, torch.float32)
        fail(f"{name} has dtype {_name(dtype)} but k has {_name(kd)}: pass {name} in k's dtype or in "
             f"{_name(allowed)} (e.g. {name}.to(k.dtype)); it would otherwise be silently "
             f"{'rounded' if dtype.itemsize < kd.itemsize else 'converted'}")


def _check_kv(k: Tensor, v: Tensor, ndim: int, shape_doc: str) -> None:
    check_tensor("k", k, ndim, INPUT_DTYPES, shape_doc)
    check_tensor("v", v, ndim, INPUT_DTYPES, shape_doc)
    if k.shape != v.shape:
        fail(f"k and v must have the same shape {shape_doc}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype is not v.dtype:
        fail(f"k and v must have the same dtype, got {_name(k.dtype)} and {_name(v.dtype)} (convert v with "
             f".to(k.dtype))")


def flow_scores(q_relay: Tensor, k: Tensor, v: Tensor, prev: Tensor | None, scale, has_cls: bool):
    """Dense flow_scores inputs (docs/semantics.md). Returns (device, scale as a float)."""
    check_tensor("q_relay", q_relay, 3, INPUT_DTYPES, "(B, H, D)")
    _check_kv(k, v, 4, "(B, H, S, D)")
    batch, heads, seq, dim = k.shape
    if q_relay.shape != (batch, heads, dim):
        fail(f"q_relay must have shape (B, H, D) = {(batch, heads, dim)} to match k, got {tuple(q_relay.shape)}")
    check_relay_dtype("q_relay", q_relay, k)
    n = seq - 1 if has_cls else seq
    if n < 1:
        fail(f"k has S={seq} tokens: the CLS variant needs at least one candidate besides the relay (S >= 2)")
    if prev is not None:
        check_tensor("prev", prev, 2, (torch.float32,), "(B, N)")
        if prev.shape != (batch, n):
            fail(f"prev must have shape (B, N) = {(batch, n)} (N = S{' - 1' if has_cls else ''}), "
                 f"got {tuple(prev.shape)}")
    device = check_same_device(q_relay=q_relay, k=k, v=v, prev=prev)
    return device, check_scale(scale)


def cu_seqlens_layout(cu_seqlens: Tensor) -> int:
    """cu_seqlens' kind and shape, (B + 1,) int32/int64 with B >= 1, without reading it: returns B."""
    check_tensor("cu_seqlens", cu_seqlens, 1, (torch.int32, torch.int64), "(B + 1,)")
    if cu_seqlens.numel() < 2:
        fail("cu_seqlens must hold B + 1 >= 2 offsets (0, then each image's end row)")
    return cu_seqlens.numel() - 1


def cu_seqlens_lengths(cu_seqlens: Tensor, rows: int, min_len: int) -> list[int]:
    """cu_seqlens (B + 1,): 0, increasing by at least ``min_len`` (0: not decreasing), ending at ``rows``; the image
    lengths (one small device-to-host copy)."""
    cu_seqlens_layout(cu_seqlens)
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if cu[0] != 0:
        fail(f"cu_seqlens must start at 0, got {cu[0]}")
    if min(lengths) < min_len:
        fail(f"cu_seqlens must increase by at least {min_len} per image (each image needs "
             f"{'a relay row and a candidate' if min_len > 1 else 'a row'}), got image lengths {lengths}")
    if min(lengths) < 0:
        fail(f"cu_seqlens must not decrease, got image lengths {lengths}")
    if cu[-1] != rows:
        fail(f"cu_seqlens must end at the row count {rows}, got {cu[-1]}")
    return lengths


def counts(name: str, values, n: int, low: int, highs: list[int]) -> list[int]:
    """Per-image counts: B ints (a sequence, or a (B,) integer tensor: one host read), each in [low, highs[b]]."""
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex():
            fail(f"{name} must be a (B,) integer tensor or B ints, got a {values.dtype} tensor of shape "
                 f"{tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        fail(f"{name} must hold one count per image ({n}), got {values!r}")
    # a plain int in range passes without building its name (hot path); anything else gets check_int's message
    return [x if type(x) is int and low <= x <= high else check_int(f"{name}[{b}]", x, low, high)
            for b, (x, high) in enumerate(zip(values, highs))]


def flow_scores_varlen(
    q_relay: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prev: Tensor | None, scale, has_cls: bool,
    read_offsets: bool = True,
):
    """Packed flow_scores inputs. Returns (device, the image lengths, scale as a float); with ``read_offsets=False``
    cu_seqlens' values are not read (the Triton op never reads them on the host) and the lengths are None."""
    check_tensor("q_relay", q_relay, 3, INPUT_DTYPES, "(B, H, D)")
    _check_kv(k, v, 3, "(T, H, D)")
    device = check_same_device(q_relay=q_relay, k=k, v=v, cu_seqlens=cu_seqlens, prev=prev)
    batch = cu_seqlens_layout(cu_seqlens)
    lengths = cu_seqlens_lengths(cu_seqlens, k.shape[0], 2 if has_cls else 1) if read_offsets else None
    _, heads, dim = k.shape
    if q_relay.shape != (batch, heads, dim):
        fail(f"q_relay must have shape (B, H, D) = {(batch, heads, dim)} for {batch} images in cu_seqlens "
             f"and k of shape {tuple(k.shape)}, got {tuple(q_relay.shape)}")
    check_relay_dtype("q_relay", q_relay, k)
    n = k.shape[0] - batch * int(has_cls)
    if prev is not None:
        check_tensor("prev", prev, 1, (torch.float32,), "(T_c,)")
        if prev.shape != (n,):
            fail(f"prev must have shape (T_c,) = ({n},), got {tuple(prev.shape)}")
    return device, lengths, check_scale(scale)


def select_gather(hidden: Tensor, cum: Tensor, index_map: Tensor | None, keep, has_cls: bool):
    """Dense select_gather inputs (index_map None: the identity 0 … N − 1, built here). Returns (device, keep as an
    int, index_map)."""
    check_tensor("hidden", hidden, 3, INPUT_DTYPES, "(B, S, C)")
    check_tensor("cum", cum, 2, (torch.float32,), "(B, N)")
    batch, seq, _ = hidden.shape
    n = seq - 1 if has_cls else seq
    if index_map is None:
        index_map = torch.arange(n, device=cum.device).expand(batch, n)
    check_tensor("index_map", index_map, 2, (torch.int64,), "(B, N)")
    for name, t in (("cum", cum), ("index_map", index_map)):
        if t.shape != (batch, n):
            fail(f"{name} must have shape (B, N) = {(batch, n)} for hidden of shape {tuple(hidden.shape)}, "
                 f"got {tuple(t.shape)}")
    keep = check_int("keep", keep, 1, seq)
    return check_same_device(hidden=hidden, cum=cum, index_map=index_map), keep, index_map


def select_gather_varlen(
    hidden: Tensor, cum: Tensor, index_map: Tensor | None, cu_seqlens: Tensor, keep, has_cls: bool
):
    """Packed select_gather inputs (keep: B ints or a (B,) integer tensor; index_map None: each image's
    0 … N_b − 1, built here). Returns (device, keep as a list of ints, index_map)."""
    check_tensor("hidden", hidden, 2, INPUT_DTYPES, "(T, C)")
    check_tensor("cum", cum, 1, (torch.float32,), "(T_c,)")
    device = check_same_device(hidden=hidden, cum=cum, index_map=index_map, cu_seqlens=cu_seqlens)
    lengths = cu_seqlens_lengths(cu_seqlens, hidden.shape[0], 2 if has_cls else 1)
    n = hidden.shape[0] - len(lengths) * int(has_cls)
    if cum.shape != (n,):
        fail(f"cum must have shape (T_c,) = ({n},) for hidden of shape {tuple(hidden.shape)}, got {tuple(cum.shape)}")
    if index_map is None:
        index_map = torch.cat([torch.arange(s - int(has_cls), device=device) for s in lengths])
    check_tensor("index_map", index_map, 1, (torch.int64,), "(T_c,)")
    if index_map.shape != (n,):
        fail(f"index_map must have shape (T_c,) = ({n},), got {tuple(index_map.shape)}")
    return device, counts("keep", keep, len(lengths), 1, lengths), index_map


def attention_scores(q: Tensor, k: Tensor, scale, key_mask: Tensor | None, span_start, span_end):
    """attention_scores inputs (the key mask's values are not read). Returns (device, scale as a float)."""
    check_tensor("q", q, 4, INPUT_DTYPES, "(B, Hq, Q, D)")
    check_tensor("k", k, 4, INPUT_DTYPES, "(B, Hkv, S, D)")
    batch, kv_heads, seq, dim = k.shape
    if q.shape[0] != batch or q.shape[3] != dim:
        fail(f"q must have shape (B, Hq, Q, D) with B = {batch}, D = {dim} as k {tuple(k.shape)}, "
             f"got {tuple(q.shape)}")
    if kv_heads < 1 or q.shape[1] % kv_heads:
        fail(f"q's {q.shape[1]} query heads must be a multiple of k's {kv_heads} key heads (grouped-query attention)")
    if q.shape[2] < 1:
        fail("q must hold at least one query row")
    check_relay_dtype("q", q, k)
    device = check_same_device(q=q, k=k, key_mask=key_mask)
    if key_mask is not None:
        check_tensor("key_mask", key_mask, 2, (torch.bool,), "(B, S)")
        if key_mask.shape != (batch, seq):
            fail(f"key_mask must have shape (B, S) = {(batch, seq)}")
    if not 0 <= span_start < span_end <= seq:
        fail(f"span={(span_start, span_end)} must satisfy 0 <= start < end <= S = {seq}")
    return device, check_scale(scale)


def text_guided_scores(q_relay: Tensor, v_relay: Tensor, k: Tensor, v: Tensor, segments, scale):
    """text_guided_scores inputs, ``segments`` flat (b, start, end, b, start, end, …). Returns (device, scale as a
    float)."""
    _check_kv(k, v, 4, "(B, Hkv, S, D)")
    check_tensor("q_relay", q_relay, 3, INPUT_DTYPES, "(B, Hq, D)")
    check_tensor("v_relay", v_relay, 3, INPUT_DTYPES, "(B, Hkv, D)")
    batch, kv_heads, seq, dim = k.shape
    if v_relay.shape != (batch, kv_heads, dim):
        fail(f"v_relay must have shape {(batch, kv_heads, dim)}, got {tuple(v_relay.shape)}")
    hq = q_relay.shape
    if kv_heads < 1 or hq[0] != batch or hq[2] != dim or hq[1] % kv_heads:
        fail(f"q_relay must have shape (B, Hq, D) with B = {batch}, D = {dim} and Hq a multiple of {kv_heads}, "
             f"got {tuple(hq)}")
    check_relay_dtype("q_relay", q_relay, k)
    check_relay_dtype("v_relay", v_relay, k)
    device = check_same_device(q_relay=q_relay, v_relay=v_relay, k=k, v=v)
    if len(segments) % 3:
        fail(f"segments must hold (b, start, end) triples, got {len(segments)} integers")
    for g in range(len(segments) // 3):
        b, start, end = (check_int(f"segments[{g}]", x, 0) for x in segments[3 * g : 3 * g + 3])
        if not (b < batch and start < end <= seq):
            fail(f"segments[{g}]={(b, start, end)} must name a sequence b < {batch} and 0 <= start < end <= {seq}")
    return device, check_scale(scale)


def entropy_on_host(entropy: Tensor) -> list[float]:
    """The normalised entropies (B,) as Python floats (float64; the prune count's one host read), each finite: a
    NaN or infinite Hn (from NaN or infinite scores upstream) has no prune count."""
    values = entropy.detach().double().tolist()
    bad = [b for b, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        fail(f"entropy must be finite, got {[values[b] for b in bad]} for image(s) {bad}: the layer's scores were not "
             f"finite (check its q, k and v for NaN or inf)")
    return values

"""Kernel microbenchmark: one FlowCut prune step per backend, against the device's copy bandwidth.

One prune step is ``ops.flow_scores`` (relay query, k, v, previous cumulative score → new score,
entropy, attention) followed by ``ops.select_gather`` keeping about half the tokens, through the public
functions (input checks included), for every backend of ``flowcut_kernels.available_backends(device)``;
"torch" is the reference composition. k and v are (B, H, S, D) transposed views of (B, S, C) projection
outputs, as a HF model hands them over.

Bytes moved are the minimum the step must touch: q_relay, k, v and the previous score read once; the new
score, the attention and the entropy written; the score and index map read for the selection; the kept
hidden rows read and written; the kept scores and indices written. GB/s = bytes / median time. The copy
bandwidth is that of ``dst.copy_(src)`` on a large tensor (1 GiB on CUDA, 256 MiB on CPU), counted as
2 × its size (read + write); "share" is the step's GB/s over it.

The Triton backend on a CPU runs only in Triton's interpreter, which says nothing about speed: it is
never measured (see :func:`measurable_backends`).

**Primitives** (:data:`PRIMITIVE_CASES`): each generic primitive of ``flowcut_kernels.ops`` per backend, against
its plain-PyTorch composition (what one writes without the package, :data:`COMPOSITIONS`), on the same inputs:

- ``attention_scores`` vs ``repeat_interleave`` of the key heads + ``matmul`` + ``softmax`` + ``mean``;
- ``text_guided_scores`` vs the same per image segment for q·k and v·v, + the head-mean value's L1 norm;
- ``topk_select`` vs a stable descending ``argsort`` + ``sort`` of the first K + a ``scatter`` mask + ``nonzero``;
- ``merge_nearest`` vs ``normalize`` + ``matmul`` + ``argmax`` + ``index_add_`` (sizes 1: a mean).

Their bytes moved are the inputs read once and the outputs written once; "vs plain" is the composition's time
over the primitive's.

**Wrapper overhead** (:func:`wrapper_overhead`, printed under the table of the ``kernels`` presets): each public
op against the raw ``torch.ops`` call it makes, at B=1, host time per call (the checks and the backend choice are
what the wrapper adds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.backends import OPS
from .timing import Progress, Timer, peak_memory_mb, summarize


@dataclass(frozen=True)
class KernelCase:
    """One shape: B images of S tokens (the CLS relay first when has_cls), H heads of D dims, C = H·D."""

    name: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    has_cls: bool

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def candidates(self) -> int:
        return self.seq - 1 if self.has_cls else self.seq

    @property
    def keep(self) -> int:
        """Rows the step keeps: about half the candidates, plus the relay row in the CLS variant."""
        return self.candidates // 2 + (1 if self.has_cls else 0)

    def bytes_moved(self, itemsize: int) -> int:
        """The minimal bytes one prune step reads and writes (see the module docstring)."""
        b, h, s, d, n = self.batch, self.heads, self.seq, self.head_dim, self.candidates
        kept = self.keep - 1 if self.has_cls else self.keep
        relay_itemsize = itemsize if self.has_cls else 4  # the mean query is float32
        scores = b * h * d * relay_itemsize + 2 * b * h * s * d * itemsize + b * n * 4  # q_relay, k, v, prev
        scores += 2 * b * n * 4 + b * 4  # cum, attn, entropy written
        select = b * n * (4 + 8)  # cum and index map read
        select += 2 * b * self.keep * self.channels * itemsize  # kept hidden rows read and written
        select += b * kept * (4 + 8)  # kept scores and indices written
        return scores + select


CLIP_L = dict(seq=577, heads=16, head_dim=64, has_cls=True)  # CLIP ViT-L/14-336
QWEN_VIT = dict(heads=16, head_dim=80, has_cls=False)  # Qwen2-VL / Qwen2.5-VL vision tower, one image

#: Kernel presets: device type -> cases. "kernels" follows issue 3 on CUDA and is cut down on CPUs.
KERNEL_PRESETS = {
    "kernels": {
        "cuda": [KernelCase("clip-l-336", b, **CLIP_L) for b in (1, 16, 64)]
        + [KernelCase("qwen-4k", 1, 4096, **QWEN_VIT), KernelCase("qwen-16k", 1, 16384, **QWEN_VIT)],
        "cpu": [KernelCase("clip-l-336", b, **CLIP_L) for b in (1, 16)] + [KernelCase("qwen-4k", 1, 4096, **QWEN_VIT)],
    },
    "kernels-tiny": {
        device: [KernelCase("tiny", 1, 65, 4, 8, True), KernelCase("tiny", 2, 65, 4, 8, True),
                 KernelCase("tiny-mean", 1, 64, 4, 8, False)]
        for device in ("cuda", "cpu")
    },
}


@dataclass(frozen=True)
class PrimitiveCase:
    """One primitive at one shape. ``op``: the primitive's name; ``dims``: its sizes (see :func:`primitive_inputs`).

    attention_scores / text_guided_scores: B, Hq, Hkv, Q (query rows; 1 for the text-guided relay), S, D, and the
    image span (start, end) of each sequence. topk_select: B, N, keep. merge_nearest: B, N, C, keep.
    """

    name: str
    op: str
    batch: int
    seq: int
    heads: int = 1
    kv_heads: int = 1
    queries: int = 1
    head_dim: int = 1
    span: tuple[int, int] = (0, 0)
    keep: int = 0

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def kept(self) -> int:
        """Columns or rows the primitive returns per image."""
        return self.span[1] - self.span[0] if self.op in ("attention_scores", "text_guided_scores") else self.keep


VICUNA_HEADS = dict(heads=32, kv_heads=32, head_dim=128)  # LLaVA-1.5-7B's decoder layer
QWEN_GQA = dict(heads=28, kv_heads=4, head_dim=128)  # Qwen2-VL-7B's decoder layer


def _primitive_cases(big: bool) -> list[PrimitiveCase]:
    batches = (1, 8) if big else (1,)
    cases = []
    for b in batches:
        cases.append(PrimitiveCase("llava-lm relay", "attention_scores", b, 636, queries=1, span=(35, 611),
                                   **VICUNA_HEADS))
    cases.append(PrimitiveCase("qwen-gqa text", "attention_scores", 1, 2176, queries=16, span=(35, 2151), **QWEN_GQA))
    for b in batches:
        cases.append(PrimitiveCase("llava-stage 2K=256", "text_guided_scores", b, 316, span=(35, 291), **VICUNA_HEADS))
    cases.append(PrimitiveCase("qwen-gqa 2116", "text_guided_scores", 1, 2176, span=(35, 2151), **QWEN_GQA))
    for b in ((1, 16, 64) if big else (1, 16)):
        cases.append(PrimitiveCase("clip-576 keep 64", "topk_select", b, 576, keep=64))
    cases.append(PrimitiveCase("qwen-16k keep 4096", "topk_select", 1, 16384, keep=4096))
    for b in ((1, 16, 64) if big else (1, 16)):
        cases.append(PrimitiveCase("clip-l keep 64", "merge_nearest", b, 576, head_dim=1024, keep=64))
    return cases


PRIMITIVE_CASES = {
    "kernels": {"cuda": _primitive_cases(True), "cpu": _primitive_cases(False)},
    "kernels-tiny": {
        device: [PrimitiveCase("tiny", "attention_scores", 2, 20, heads=4, kv_heads=2, queries=3, head_dim=8,
                               span=(2, 14)),
                 PrimitiveCase("tiny", "text_guided_scores", 2, 20, heads=4, kv_heads=2, head_dim=8, span=(2, 14)),
                 PrimitiveCase("tiny", "topk_select", 2, 40, keep=9),
                 PrimitiveCase("tiny", "merge_nearest", 2, 40, head_dim=16, keep=9)]
        for device in ("cuda", "cpu")
    },
}


def primitive_inputs(case: PrimitiveCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Seeded inputs of ``case`` on ``device`` (q/k/v in ``dtype``, scores float32)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    b, s = case.batch, case.seq
    if case.op == "attention_scores":
        return dict(q=randn(b, case.heads, case.queries, case.head_dim), k=randn(b, case.kv_heads, s, case.head_dim))
    if case.op == "text_guided_scores":
        return dict(q_relay=randn(b, case.heads, case.head_dim), v_relay=randn(b, case.kv_heads, case.head_dim),
                    k=randn(b, case.kv_heads, s, case.head_dim), v=randn(b, case.kv_heads, s, case.head_dim),
                    segments=[(i, *case.span) for i in range(b)])
    scores = torch.rand(b, s, generator=generator, device=device)
    if case.op == "topk_select":
        return dict(scores=scores)
    hidden = randn(b, s, case.head_dim)
    selection = ops.topk_select(scores, case.keep, backend="torch")
    return dict(hidden=hidden, keys=hidden, selection=selection)


def primitive_call(case: PrimitiveCase, inputs: dict, backend: str):
    """The primitive of ``case`` through ``flowcut_kernels.ops`` with ``backend``."""
    scale = case.head_dim ** -0.5
    if case.op == "attention_scores":
        return ops.attention_scores(inputs["q"], inputs["k"], scale=scale, span=case.span, backend=backend)
    if case.op == "text_guided_scores":
        return ops.text_guided_scores(inputs["q_relay"], inputs["v_relay"], inputs["k"], inputs["v"],
                                      inputs["segments"], scale=scale, backend=backend)
    if case.op == "topk_select":
        return ops.topk_select(inputs["scores"], case.keep, backend=backend)
    return ops.merge_nearest(inputs["hidden"], inputs["keys"], inputs["selection"], backend=backend)


def plain_attention_scores(q, k, scale, span):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = (torch.matmul(q, k.transpose(-1, -2)).float() * scale).softmax(-1)
    return probs.mean(dim=(1, 2))[:, span[0]:span[1]]


def plain_text_guided_scores(q_relay, v_relay, k, v, segments, scale):
    groups = q_relay.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    v_relay = v_relay.repeat_interleave(groups, dim=1)
    out = []
    for b, start, end in segments:
        kk, vv = k[b, :, start:end], v[b, :, start:end]  # (H, n, D)
        rel = (torch.matmul(kk, q_relay[b, :, :, None]).squeeze(-1).float() * scale).softmax(-1).mean(0)
        sem = (torch.matmul(vv, v_relay[b, :, :, None]).squeeze(-1).float() * scale).softmax(-1).mean(0)
        rho = vv.float().mean(0).abs().sum(-1)
        out.append((rel + sem) * rho)
    return torch.cat(out)


def plain_topk_select(scores, keep):
    order = scores.argsort(dim=1, descending=True, stable=True)
    kept = order[:, :keep].sort(dim=1).values
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
    dropped = (~mask).nonzero()[:, 1].view(scores.shape[0], -1)
    return kept, dropped, mask


def plain_merge_nearest(hidden, keys, kept, dropped):
    batch, _, channels = hidden.shape
    unit = F.normalize(keys.float(), dim=-1)
    take = lambda x, rows: x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    nearest = torch.matmul(take(unit, dropped), take(unit, kept).transpose(1, 2)).argmax(-1)  # (B, M)
    flat = (nearest + torch.arange(batch, device=hidden.device)[:, None] * kept.shape[1]).flatten()
    sums = take(hidden, kept).float().flatten(0, 1).index_add_(0, flat, take(hidden, dropped).float().flatten(0, 1))
    sizes = torch.ones(sums.shape[0], device=hidden.device).index_add_(
        0, flat, torch.ones(flat.shape[0], device=hidden.device))
    return (sums / sizes[:, None]).to(hidden.dtype).view(batch, -1, channels), sizes.view(batch, -1)


def composition_call(case: PrimitiveCase, inputs: dict):
    """The plain-PyTorch composition of ``case``'s primitive (module docstring)."""
    scale = case.head_dim ** -0.5
    if case.op == "attention_scores":
        return plain_attention_scores(inputs["q"], inputs["k"], scale, case.span)
    if case.op == "text_guided_scores":
        return plain_text_guided_scores(inputs["q_relay"], inputs["v_relay"], inputs["k"], inputs["v"],
                                        inputs["segments"], scale)
    if case.op == "topk_select":
        return plain_topk_select(inputs["scores"], case.keep)
    selection = inputs["selection"]
    return plain_merge_nearest(inputs["hidden"], inputs["keys"], selection.kept, selection.dropped)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


def primitive_bytes(case: PrimitiveCase, inputs: dict, output) -> int:
    """Inputs read once plus outputs written once (merge_nearest: the hidden/key rows, not the selection)."""
    read = {k: v for k, v in inputs.items() if k != "selection"}
    if case.op == "merge_nearest":
        sel = inputs["selection"]
        read["rows"] = (sel.kept, sel.dropped)
    return _nbytes(read) + _nbytes(output)


def cases_for(preset: str, device: torch.device, batches: list[int] | None = None) -> list[KernelCase]:
    """The cases of ``preset`` on ``device``; ``batches`` replaces the batch sizes of the CLS-variant cases."""
    cases = KERNEL_PRESETS[preset]["cuda" if torch.device(device).type == "cuda" else "cpu"]
    if not batches:
        return list(cases)
    out, seen = [], set()
    for case in cases:
        if not case.has_cls:
            out.append(case)
            continue
        for batch in batches:
            key = (case.name, batch)
            if key not in seen:
                seen.add(key)
                out.append(KernelCase(case.name, batch, case.seq, case.heads, case.head_dim, case.has_cls))
    return out


def measurable_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(backends to time on ``device``, {backend: why it is skipped})."""
    device = torch.device(device)
    usable, skipped = [], {}
    for name, why in ops.available_backends(device, reasons=True).items():
        if why is not None:
            skipped[name] = why
        elif name == "triton" and device.type == "cpu":
            skipped[name] = "Triton runs on a CPU only in its interpreter, which is no speed measurement"
        else:
            usable.append(name)
    return usable, skipped


def step_inputs(case: KernelCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Seeded inputs of one prune step, built on ``device``.

    q_relay (B, H, D) (float32 mean query in the mean variant), k and v (B, H, S, D) transposed views,
    prev (B, N) float32, index_map (B, N) int64, hidden (B, S, C).
    """
    b, s, h, d, n = case.batch, case.seq, case.heads, case.head_dim, case.candidates
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q, k, v = (randn(b, s, case.channels).view(b, s, h, d).transpose(1, 2) for _ in range(3))
    q_relay = q[:, :, 0] if case.has_cls else q.mean(dim=2, dtype=torch.float32)
    prev = torch.rand(b, n, generator=generator, device=device)
    index_map = torch.arange(n, device=device).repeat(b, 1)
    return dict(q_relay=q_relay, k=k, v=v, prev=prev, index_map=index_map, hidden=randn(b, s, case.channels))


def prune_step(inputs: dict, case: KernelCase, backend: str):
    """flow_scores then select_gather (keep = case.keep) with ``backend``; returns select_gather's output."""
    cum, _, _ = ops.flow_scores(
        inputs["q_relay"], inputs["k"], inputs["v"], inputs["prev"],
        scale=case.head_dim ** -0.5, has_cls=case.has_cls, backend=backend,
    )
    return ops.select_gather(inputs["hidden"], cum, inputs["index_map"], case.keep, has_cls=case.has_cls,
                             backend=backend)


def copy_bandwidth_gbps(device: torch.device, repeats: int = 10) -> float:
    """Median GB/s of a large ``copy_`` (1 GiB on CUDA, 256 MiB elsewhere), read + write counted."""
    device = torch.device(device)
    nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    timer.once(lambda: dst.copy_(src))
    median_ms = summarize([timer.once(lambda: dst.copy_(src)) for _ in range(repeats)]).median_ms
    return 2 * nbytes / (median_ms * 1e-3) / 1e9


def run(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    backends: list[str],
    *,
    batches: list[int] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    progress: bool = True,
) -> tuple[list[dict], float]:
    """Time one prune step per case and backend, then every primitive case (:data:`PRIMITIVE_CASES`) per backend
    and its plain composition; returns (rows, copy bandwidth GB/s).

    Each row: case, batch, seq, heads, head_dim, channels, has_cls, keep, backend, median/p20/p80 µs,
    peak_mem_mb, bytes, gbps, bw_share, speedup_vs_torch (None without a torch row), op ("prune_step" or the
    primitive), variant (the backend, or "composition"), ref_method; primitive rows also speedup_vs_composition.
    Backends are timed round-robin per case.
    """
    device = torch.device(device)
    cases = cases_for(preset, device, batches)
    primitives = PRIMITIVE_CASES[preset]["cuda" if device.type == "cuda" else "cpu"]
    copy_gbps = copy_bandwidth_gbps(device)
    timer = Timer(device, flush_cache=True)
    bar = Progress((len(cases) * len(backends) + len(primitives) * (len(backends) + 1)) * repeats, enabled=progress)
    rows = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for case in cases:
        inputs = step_inputs(case, device, dtype)
        fns = {b: (lambda b=b, inputs=inputs, case=case: prune_step(inputs, case, b)) for b in backends}
        with torch.inference_mode():
            for fn in fns.values():
                for _ in range(max(warmup, 1)):
                    fn()
            peaks = {backend: peak_memory_mb(fn, device) for backend, fn in fns.items()}
            timings = timer.round_robin(fns, repeats, bar, f"{case.name} B={case.batch}")
        nbytes = case.bytes_moved(itemsize)
        for backend, timing in timings.items():
            gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
            rows.append(dict(
                case=case.name, batch=case.batch, seq=case.seq, heads=case.heads, head_dim=case.head_dim,
                channels=case.channels, has_cls=case.has_cls, keep=case.keep, backend=backend,
                median_us=timing.median_ms * 1e3, p20_us=timing.p20_ms * 1e3, p80_us=timing.p80_ms * 1e3,
                peak_mem_mb=peaks[backend], bytes=nbytes, gbps=gbps, bw_share=gbps / copy_gbps,
                speedup_vs_torch=(timings["torch"].median_ms / timing.median_ms) if "torch" in timings else None,
                op="prune_step", variant=backend, ref_method="flowcut-torch",
            ))
    for case in primitives:
        rows += _time_primitive(case, device, dtype, backends, timer, bar, warmup, repeats, copy_gbps)
    return rows, copy_gbps


def _time_primitive(case, device, dtype, backends, timer, bar, warmup, repeats, copy_gbps) -> list[dict]:
    """One primitive case: every backend and the plain composition, round-robin."""
    inputs = primitive_inputs(case, device, dtype)
    fns = {b: (lambda b=b: primitive_call(case, inputs, b)) for b in backends}
    fns["composition"] = lambda: composition_call(case, inputs)
    with torch.inference_mode():
        output = None
        for fn in fns.values():
            for _ in range(max(warmup, 1)):
                output = fn()
        nbytes = primitive_bytes(case, inputs, primitive_call(case, inputs, backends[0]))
        peaks = {name: peak_memory_mb(fn, device) for name, fn in fns.items()}
        timings = timer.round_robin(fns, repeats, bar, f"{case.op} {case.name} B={case.batch}")
    del output
    rows = []
    for variant, timing in timings.items():
        gbps = nbytes / (timing.median_ms * 1e-3) / 1e9
        rows.append(dict(
            case=f"{case.op} {case.name}", batch=case.batch, seq=case.seq, heads=case.heads, head_dim=case.head_dim,
            channels=case.channels, has_cls=False, keep=case.kept, backend=variant,
            median_us=timing.median_ms * 1e3, p20_us=timing.p20_ms * 1e3, p80_us=timing.p80_ms * 1e3,
            peak_mem_mb=peaks[variant], bytes=nbytes, gbps=gbps, bw_share=gbps / copy_gbps,
            speedup_vs_torch=(timings["torch"].median_ms / timing.median_ms) if "torch" in timings else None,
            speedup_vs_composition=timings["composition"].median_ms / timing.median_ms,
            op=case.op, variant=variant, ref_method="composition", kv_heads=case.kv_heads, queries=case.queries,
        ))
    return rows


def overhead_calls(device: torch.device, dtype: torch.dtype, backend: str) -> dict[str, tuple]:
    """op -> (public call, raw torch op call) on the same B=1 inputs: the FlowCut ops at CLIP-L/336 shapes (the
    packed ones on the one image packed), the primitives at their kernels-preset B=1 shapes."""
    case = KernelCase("clip-l-336", 1, **CLIP_L)
    x = step_inputs(case, device, dtype)
    scale = case.head_dim ** -0.5
    raw = {name: ops.unchecked(name, backend) for name in OPS}
    cu = torch.tensor([0, case.seq], device=device)
    kp, vp = (t[0].transpose(0, 1) for t in (x["k"], x["v"]))
    hp, prev, imap = x["hidden"][0], x["prev"][0], x["index_map"][0]
    calls = {
        "flow_scores": (lambda: ops.flow_scores(x["q_relay"], x["k"], x["v"], x["prev"], scale=scale, backend=backend),
                        lambda: raw["flow_scores"](x["q_relay"], x["k"], x["v"], x["prev"], scale, True, True)),
        "select_gather": (lambda: ops.select_gather(x["hidden"], x["prev"], x["index_map"], case.keep,
                                                    backend=backend),
                          lambda: raw["select_gather"](x["hidden"], x["prev"], x["index_map"], case.keep, True)),
        "flow_scores_varlen": (
            lambda: ops.flow_scores_varlen(x["q_relay"], kp, vp, cu, prev, scale=scale, backend=backend),
            lambda: raw["flow_scores_varlen"](x["q_relay"], kp, vp, cu, prev, scale, True, True)),
        "select_gather_varlen": (
            lambda: ops.select_gather_varlen(hp, prev, imap, cu, [case.keep], backend=backend),
            lambda: raw["select_gather_varlen"](hp, prev, imap, cu, [case.keep], True)),
    }
    for pcase in PRIMITIVE_CASES["kernels"][device.type if device.type == "cuda" else "cpu"]:
        if pcase.batch != 1 or pcase.op in calls:
            continue
        inputs = primitive_inputs(pcase, device, dtype)
        calls[pcase.op] = (lambda c=pcase, i=inputs: primitive_call(c, i, backend),
                           _raw_primitive(pcase, inputs, raw[pcase.op]))
    return calls


def _raw_primitive(case: PrimitiveCase, inputs: dict, op):
    """The torch op call :func:`primitive_call` makes for ``case``, its inputs converted once, ahead."""
    scale = case.head_dim ** -0.5
    if case.op == "attention_scores":
        return lambda: op(inputs["q"], inputs["k"], scale, None, *case.span)
    if case.op == "text_guided_scores":
        flat = [n for segment in inputs["segments"] for n in segment]
        return lambda: op(inputs["q_relay"], inputs["v_relay"], inputs["k"], inputs["v"], flat, scale)
    if case.op == "topk_select":
        scores = inputs["scores"]
        cu = torch.tensor([0, scores.shape[1]], device=scores.device)
        return lambda: op(scores[0], cu, [case.keep], None)
    s = inputs["selection"]
    hidden = inputs["hidden"][0]
    return lambda: op(hidden, hidden, s.kept[0], s.dropped[0], s.kept_cu, s.dropped_cu, None)


def wrapper_overhead(device: torch.device, dtype: torch.dtype, backends: list[str], rounds: int = 7,
                     calls: int = 50) -> list[dict]:
    """Host time per call of each public op against its raw torch op (:func:`overhead_calls`), per backend: the
    median over ``rounds`` interleaved rounds of ``calls`` back-to-back calls each, synchronized at the end of a
    round (host-side launch cost is what the wrappers add). Rows: op, backend, public_us, raw_us, ratio."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    with torch.inference_mode():
        for backend in backends:
            for name, (public, raw) in overhead_calls(device, dtype, backend).items():
                times = {"public": [], "raw": []}
                for fn in (public, raw):
                    fn()
                for _ in range(rounds):
                    for kind, fn in (("public", public), ("raw", raw)):
                        sync()
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        sync()
                        times[kind].append((time.perf_counter() - start) / calls * 1e6)
                public_us, raw_us = (sorted(times[k])[rounds // 2] for k in ("public", "raw"))
                rows.append(dict(op=name, backend=backend, public_us=public_us, raw_us=raw_us,
                                 ratio=public_us / raw_us))
    return rows

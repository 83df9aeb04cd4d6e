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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
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
    """Time one prune step per case and backend; returns (rows, copy bandwidth GB/s).

    Each row: case, batch, seq, heads, head_dim, channels, has_cls, keep, backend, median/p20/p80 µs,
    peak_mem_mb, bytes, gbps, bw_share, speedup_vs_torch (None without a torch row). Backends are timed
    round-robin per case.
    """
    device = torch.device(device)
    cases = cases_for(preset, device, batches)
    copy_gbps = copy_bandwidth_gbps(device)
    timer = Timer(device, flush_cache=True)
    bar = Progress(len(cases) * len(backends) * repeats, enabled=progress)
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
            ))
    return rows, copy_gbps

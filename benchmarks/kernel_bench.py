"""Kernel microbenchmark: one FlowCut prune step (flow_scores + select_gather) per backend.

    python benchmarks/kernel_bench.py [--device cuda] [--batch 1 16 64] [--json PATH] [--markdown PATH] [--plot PATH]

Every backend of ``flowcut_kernels.available_backends(device)`` ("torch" is the reference composition;
Triton is skipped on a CPU, where it only runs in its interpreter) is timed on the CLIP ViT-L/14-336 shape
(S=577, H=16, D=64, C=1024; B = 1, 16, 64) and on one Qwen-VL-sized image (S=4096 and 16384, mean-query
variant), fewer and smaller cases on a CPU. Reported: median µs, the minimal bytes moved and the GB/s
they give, its share of the device's measured copy bandwidth, and the speed-up over "torch". Then the generic
primitives (attention_scores, text_guided_scores, topk_select, merge_nearest) per backend against their
plain-PyTorch compositions (the speed-up over the composition).
The implementation is :mod:`flowcut_kernels.bench.kernels`; this script is
``python -m flowcut_kernels.bench --preset kernels`` with the same options. (The file is not called
kernels.py: run as a script, its directory comes first on sys.path, and transformers would import it as
the Hugging Face ``kernels`` package.)
"""

from __future__ import annotations

import sys

import torch

from flowcut_kernels import bench
from flowcut_kernels.bench import kernels as bench_kernels


def kernel_benchmark(
    device: str | torch.device = "cuda" if torch.cuda.is_available() else "cpu",
    *,
    dtype: torch.dtype | None = None,
    preset: str = "kernels",
    batches: list[int] | None = None,
    backends: list[str] | None = None,
    warmup: int = 3,
    repeats: int = 20,
) -> tuple[list[dict], float]:
    """Time one prune step per case and backend, then the primitives; returns (rows, copy bandwidth in GB/s).

    Rows as :func:`flowcut_kernels.bench.kernels.run` gives them (case, shape, backend, median_us, gbps,
    bw_share, speedup_vs_torch, …). ``backends`` defaults to every measurable backend on ``device``.
    """
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if backends is None:
        backends = bench_kernels.measurable_backends(device)[0]
    return bench_kernels.run(preset, device, dtype, backends, batches=batches, warmup=warmup, repeats=repeats,
                             progress=False)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--preset" not in argv:
        argv = ["--preset", "kernels", *argv]
    return bench.run(argv)


if __name__ == "__main__":
    main()

"""The prefill benchmark: ``python -m flowcut_kernels.bench`` (also the ``flowcut-bench`` command).

- :mod:`.cli` — arguments, the run, the printed table and the written files.
- :mod:`.presets` — CLIP / LLaVA-1.5 presets (random weights at real shapes) and the methods timed on them
  (batch-schedule, per-image pass vs serial passes, the language-model stage).
- :mod:`.scenarios` — LLaVA-NeXT and Qwen2-VL presets: whole models (CUDA) and their vision towers.
- :mod:`.random_models` — seeded random CLIP / SigLIP / Qwen2-VL towers at real shapes with sharpened attention,
  and their pixels (every preset and scenario builds on them).
- :mod:`.checkpoint` — ``--model``: a real LLaVA, CLIP or SigLIP checkpoint, checked from its config, then loaded.
- :mod:`.kernels` — the kernel microbenchmark (one prune step per backend; the primitives vs their plain
  compositions).
- :mod:`.timing` — interleaved timing, peak memory, the progress line.
- :mod:`.report` — tables, markdown and JSON.
- :mod:`.plots` — the PNG: bars for one (batch, target), lines with p20–p80 bands for sweeps, kernel bars.
"""

from .cli import main, run

__all__ = ["main", "run"]

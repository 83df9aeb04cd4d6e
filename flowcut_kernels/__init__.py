"""flowcut_kernels: FlowCut visual-token pruning (arXiv 2505.19536) as fused ops and HF model patches.

- :mod:`flowcut_kernels.ops` — ``flow_scores``, ``select_gather``, ``prune_count`` (``torch.ops.flowcut.*``)
  and their backends.
- :func:`encode` — a pruned pass through a HF CLIP, SigLIP, ViT or DINOv2 vision tower (:mod:`flowcut_kernels.models`).
- :func:`flowcut` / :func:`remove_flowcut` — patch one model instance and its processor, reversibly: LLaVA-1.5
  (CLIP or SigLIP tower), LLaVA-NeXT (anyres), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 (with the
  language-model stage where the family's recipe has it), Gemma 3 (whole pooling windows), LLaVA-OneVision (anyres
  SigLIP crops, images), InternVL (whole pixel-shuffle groups over tiles), and bare CLIP, SigLIP, ViT and DINOv2
  vision towers.
- :func:`calibrate_schedule` / :class:`StaticSchedule` — FlowCut with per-layer counts fixed in advance: no host
  reads, ``torch.compile(fullgraph=True)`` and CUDA graphs.
- :func:`build_info` — how the native extension was built (or why it is unavailable).
- ``python -m flowcut_kernels.bench`` — the prefill benchmark (:mod:`flowcut_kernels.bench`).
"""

from . import ops
from .checks import FlowCutInputError
from .models.encoder import FlowCutOutput, encode
from .models.llava import FlowCutImageFeatures
from .models.registry import FlowCutConfig, flowcut, remove_flowcut
from .models.schedule import StaticSchedule, calibrate_schedule
from .models.vision import FlowCutVisionOutput, FlowCutVisionProjectionOutput
from .ops import available_backends, reference
from .ops.native import build_info

__version__ = "0.1.0"

__all__ = [
    "FlowCutConfig",
    "FlowCutImageFeatures",
    "FlowCutInputError",
    "FlowCutOutput",
    "FlowCutVisionOutput",
    "FlowCutVisionProjectionOutput",
    "StaticSchedule",
    "available_backends",
    "build_info",
    "calibrate_schedule",
    "encode",
    "flowcut",
    "ops",
    "reference",
    "remove_flowcut",
]

"""flowcut_kernels: FlowCut visual-token pruning (arXiv 2505.19536) as fused ops and HF model patches.

- :mod:`flowcut_kernels.ops` — ``flow_scores``, ``select_gather``, ``prune_count`` (``torch.ops.flowcut.*``).
- :func:`encode` — a pruned pass through a HF CLIP or SigLIP vision tower.
- :func:`flowcut` / :func:`remove_flowcut` — patch one model instance (LLaVA-1.5, CLIP/SigLIP towers)
  and its processor, reversibly.
- ``python -m flowcut_kernels.bench`` — the prefill benchmark.
"""

from . import ops, reference
from .checks import FlowCutInputError
from .encoder import FlowCutOutput, encode
from .llava import FlowCutImageFeatures
from .ops import available_backends
from .patch import FlowCutConfig, FlowCutVisionOutput, FlowCutVisionProjectionOutput, flowcut, remove_flowcut

__version__ = "0.1.0"

__all__ = [
    "FlowCutConfig",
    "FlowCutImageFeatures",
    "FlowCutInputError",
    "FlowCutOutput",
    "FlowCutVisionOutput",
    "FlowCutVisionProjectionOutput",
    "available_backends",
    "encode",
    "flowcut",
    "ops",
    "reference",
    "remove_flowcut",
]

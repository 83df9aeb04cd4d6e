"""flowcut_kernels: FlowCut visual-token pruning (arXiv 2505.19536) as fused ops and HF model patches.

- :mod:`flowcut_kernels.ops` — ``flow_scores``, ``select_gather``, ``prune_count`` (``torch.ops.flowcut.*``)
  and their backends.
- :func:`encode` — a pruned pass through a HF CLIP or SigLIP vision tower (:mod:`flowcut_kernels.models`).
- :func:`flowcut` / :func:`remove_flowcut` — patch one model instance (LLaVA-1.5, CLIP/SigLIP towers)
  and its processor, reversibly.
- ``python -m flowcut_kernels.bench`` — the prefill benchmark (:mod:`flowcut_kernels.bench`).
"""

from . import ops
from .checks import FlowCutInputError
from .models import synthetic
from .models.encoder import FlowCutOutput, encode
from .models.llava import FlowCutImageFeatures
from .models.registry import FlowCutConfig, flowcut, remove_flowcut
from .models.vision import FlowCutVisionOutput, FlowCutVisionProjectionOutput
from .ops import available_backends, reference

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
    "synthetic",
]

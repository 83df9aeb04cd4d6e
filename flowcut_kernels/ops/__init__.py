"""The op surface other libraries build on: checked inputs, a backend choice, torch ops.

FlowCut's ops (:mod:`.api`): ``flow_scores``, ``select_gather``, ``prune_count`` and the packed-batch
``flow_scores_varlen``, ``select_gather_varlen``, ``prune_counts``. Generic primitives
(:mod:`.primitives`): ``topk_select``, ``gather_rows``, ``merge_nearest``, ``attention_scores``,
``text_guided_scores``. Each function checks its inputs (:mod:`.validate`, shared with the reference and
Triton ops), picks a backend (:mod:`.backends`) and calls its torch op (schemas and fakes: :mod:`.library`).
Backends: "torch" (the reference, :mod:`.reference`), "triton" (:mod:`.triton`) and "native" (C++/CUDA from the
compiled ``flowcut_kernels._C``, :mod:`.native`); the optional ones load at import. :func:`unchecked` gives a
resolved backend's torch op without the checks, for the package's own loops.
"""

from ..checks import FlowCutInputError
from . import library, reference, validate  # noqa: F401 - library registers torch.ops.flowcut.flow_scores / …
from .api import flow_scores, flow_scores_varlen, prune_count, prune_counts, select_gather, select_gather_varlen
from .backends import (
    Backend, available_backends, load_optional_backends, register_backend, resolve_backend, unchecked,
)
from .primitives import Selection, attention_scores, gather_rows, merge_nearest, text_guided_scores, topk_select

__all__ = [
    "Backend",
    "FlowCutInputError",
    "Selection",
    "attention_scores",
    "available_backends",
    "gather_rows",
    "merge_nearest",
    "text_guided_scores",
    "topk_select",
    "unchecked",
    "flow_scores",
    "flow_scores_varlen",
    "prune_count",
    "prune_counts",
    "register_backend",
    "resolve_backend",
    "select_gather",
    "select_gather_varlen",
]

load_optional_backends()

"""The "native" backend: hand-written C++ (CPU) and CUDA kernels from the compiled ``flowcut_kernels._C``.

Importing ``_C`` loads its op library, which registers ``torch.ops.flowcut.native_flow_scores`` and
``torch.ops.flowcut.native_select_gather``, their packed forms ``native_flow_scores_varlen`` and
``native_select_gather_varlen``, and the generic primitives ``native_attention_scores``,
``native_text_guided_scores``, ``native_topk_select`` and ``native_merge_nearest`` (csrc/ops.cpp) with CPU
kernels, and CUDA kernels when the extension was built with CUDA. This module adds their fake (meta)
implementations (the library's, shared by every backend) and registers the backend with
:mod:`flowcut_kernels.ops.backends`. It always imports: without a usable ``_C`` (not built,
or built but not loading) it records why with ``backends.mark_unavailable`` (shown by
``available_backends(device, reasons=True)`` and the benchmark's "skipped" lines), warns once unless
``FLOWCUT_BUILD_NATIVE=0`` is set, and :func:`build_info` raises that reason; the other backends keep working.
A ``_C`` built without its CUDA kernels is recorded with ``backends.mark_missing_device``: the first op on a
CUDA device warns once with the reason. The reasons come from the build's record next to ``_C``,
``_build_status.json`` (python/native_build.py writes it).

Shapes: B images, H heads, S tokens (relay row first when ``has_cls``), D head dim, C hidden size,
N candidates (S − 1 with a CLS token, S without), K kept candidates (keep − 1 with CLS, else keep); a packed
batch holds its images' T rows along one axis (image b: rows cu_seqlens[b] … cu_seqlens[b+1]).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from .backends import ALL_DTYPES, Backend, mark_missing_device, mark_unavailable, register_backend
from .library import register_fakes

_HOW = (
    "`pip install --no-build-isolation -e .` in a source checkout, with torch and ninja installed first (so that "
    "the build sees torch)"
)
_CUDA_HOW = (
    "`FLOWCUT_BUILD_NATIVE=1 pip install -v --no-build-isolation -e .`, which stops at what fails instead of leaving "
    "them out"
)


def _build_status() -> dict:
    """What the build skipped and why: {"native": why _C is not built, "cuda": why it has no CUDA kernels}."""
    path = Path(__file__).parent.parent / "_build_status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


_STATUS = _build_status()


def _load():
    """(the ``_C`` module, None), or (None, why the native backend is unavailable)."""
    what = "the compiled extension flowcut_kernels._C"
    if importlib.util.find_spec("flowcut_kernels._C") is None:
        why = _STATUS.get("native") or "this install skipped it"
        return None, f"{what} is not built ({why}); build it with {_HOW}"
    try:
        from .. import _C
    except ImportError as error:
        return None, f"{what} does not load ({error}); rebuild it with {_HOW}"
    if not hasattr(torch.ops.flowcut, "native_flow_scores"):
        return None, f"{what} loaded but registered no torch.ops.flowcut.native_* ops; rebuild it with {_HOW}"
    return _C, None


_C, UNAVAILABLE_REASON = _load()


def build_info() -> dict:
    """How ``_C`` was built: {"version": str, "with_cuda": bool, "cuda_archs": ["sm_80", "sm_90", "compute_90"],
    "cuda_skipped": None, or why it has no CUDA kernels}.

    Raises RuntimeError saying why when the extension is unavailable.
    """
    if _C is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    info = _C.build_info()
    info["cuda_skipped"] = None if info["with_cuda"] else (_STATUS.get("cuda") or "it was built without CUDA")
    return info


if _C is None:
    DEVICE_TYPES: tuple[str, ...] = ()
    mark_unavailable("native", UNAVAILABLE_REASON)
    if os.environ.get("FLOWCUT_BUILD_NATIVE", "").strip().lower() not in ("0", "false", "no", "off"):
        warnings.warn(
            f"flowcut_kernels: the 'native' backend (C++/CUDA kernels) is unavailable, so backend='auto' uses "
            f"another one: {UNAVAILABLE_REASON}. Set FLOWCUT_BUILD_NATIVE=0 to silence this warning."
        )
else:
    register_fakes("native_")  # the same output shapes as every backend's ops
    DEVICE_TYPES = ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)
    register_backend(Backend.from_library("native", "native_", DEVICE_TYPES, ALL_DTYPES))
    if not _C.WITH_CUDA:
        mark_missing_device("native", "cuda", f"{build_info()['cuda_skipped']}; build them with {_CUDA_HOW}")

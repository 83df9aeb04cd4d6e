"""The "native" backend: hand-written C++ (CPU) and CUDA kernels from the compiled ``flowcut_kernels._C``.

Importing ``_C`` loads its op library, which registers ``torch.ops.flowcut.native_flow_scores`` and
``torch.ops.flowcut.native_select_gather`` (csrc/ops.cpp) with CPU kernels, and CUDA kernels when the
extension was built with CUDA. This module adds their fake (meta) implementations and registers the
backend with :mod:`flowcut_kernels.ops.backends`. Without a usable ``_C`` it raises ImportError, which
``ops.backends`` records as the reason "native" is unavailable; the other backends keep working.

Shapes: B images, H heads, S tokens (relay row first when ``has_cls``), D head dim, C hidden size,
N candidates (S − 1 with a CLS token, S without), K kept candidates (keep − 1 with CLS, else keep).
"""

from __future__ import annotations

import torch

from .backends import Backend, register_backend
from .library import flow_scores_fake, select_gather_fake

_BUILD_HINT = (
    "build it from a source checkout with `pip install --no-build-isolation -e .` (torch and ninja installed "
    "first, so that the build sees torch; FLOWCUT_BUILD_NATIVE=0 skips it)"
)

try:
    from .. import _C
except ImportError as error:
    raise ImportError(
        f"the compiled extension flowcut_kernels._C is missing or does not load ({error}); {_BUILD_HINT}"
    ) from error

if not hasattr(torch.ops.flowcut, "native_flow_scores"):
    raise ImportError(f"flowcut_kernels._C loaded but registered no torch.ops.flowcut.native_* ops; {_BUILD_HINT}")


def build_info() -> dict:
    """How ``_C`` was built: {"version": str, "with_cuda": bool, "cuda_archs": ["80", "90a", ...]}."""
    return _C.build_info()


# The same output shapes as every backend's ops.
torch.library.register_fake("flowcut::native_flow_scores")(flow_scores_fake)
torch.library.register_fake("flowcut::native_select_gather")(select_gather_fake)

DEVICE_TYPES = ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)

register_backend(
    Backend(
        "native", torch.ops.flowcut.native_flow_scores, torch.ops.flowcut.native_select_gather, DEVICE_TYPES
    )
)

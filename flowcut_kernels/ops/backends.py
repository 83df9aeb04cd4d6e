"""The backend registry: which implementation of the ops runs for a device, and why one cannot.

"torch" (the reference, :mod:`flowcut_kernels.ops.library`) runs everywhere. The optional backends
("triton", "native") register themselves when their module imports; one whose import fails is
unavailable, with its reason in :func:`available_backends` ``(device, reasons=True)``.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..checks import require
from . import library  # noqa: F401 - defines the reference ops registered below

@dataclass(frozen=True)
class Backend:
    """A backend: its two ops (called like the reference ops) and the device types it runs on."""

    name: str
    flow_scores: Callable
    select_gather: Callable
    device_types: tuple[str, ...]


BACKENDS: dict[str, Backend] = {}
UNAVAILABLE: dict[str, str] = {}  # backend name -> why it could not be loaded
# "auto" takes the first backend in this order that runs on the device type.
_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
_OPTIONAL = {"triton": "flowcut_kernels.ops.triton", "native": "flowcut_kernels.ops.native"}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable by name (backend modules call this when they load)."""
    BACKENDS[backend.name] = backend
    UNAVAILABLE.pop(backend.name, None)


def load_optional_backends() -> None:
    """Import the optional backend modules; a failure makes the backend unavailable, with its reason."""
    for name, module in _OPTIONAL.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any failure only disables this backend
            UNAVAILABLE[name] = f"{module} failed to load: {type(error).__name__}: {error}"


register_backend(Backend("torch", torch.ops.flowcut.flow_scores, torch.ops.flowcut.select_gather, ("cpu", "cuda")))


def _order(device_type: str) -> list[str]:
    known = _AUTO_ORDER.get(device_type, ("torch",))
    return list(known) + sorted(set(BACKENDS) - set(known))


def available_backends(device: torch.device | str, *, reasons: bool = False) -> list[str] | dict[str, str | None]:
    """The backends that run on ``device``, fastest first ("auto" takes the first).

    "torch" (the reference) runs everywhere. With ``reasons=True``, a dict of every known backend
    name to None (available) or the reason it is not available on ``device``.
    """
    device_type = torch.device(device).type  # also rejects a malformed device string
    usable = [n for n in _order(device_type) if n in BACKENDS and device_type in BACKENDS[n].device_types]
    if not reasons:
        return usable
    report: dict[str, str | None] = {}
    for name in _order(device_type) + sorted(UNAVAILABLE):
        if name in usable:
            report[name] = None
        elif name in UNAVAILABLE:
            report[name] = UNAVAILABLE[name]
        elif name in BACKENDS:
            report[name] = f"runs on {'/'.join(BACKENDS[name].device_types)} tensors, not {device_type}"
    return report


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device``; a clear error otherwise."""
    usable = available_backends(device)
    require(isinstance(backend, str), f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        return usable[0]
    if backend not in usable:
        why = available_backends(device, reasons=True).get(backend)
        require(
            False,
            f"backend={backend!r} is not available on {torch.device(device)}"
            + (f" ({why})" if why else "")
            + f"; choose 'auto' or one of {usable}",
        )
    return backend



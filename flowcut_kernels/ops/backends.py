"""The backend registry: which implementation of the ops runs for a device, and why one cannot.

"torch" (the reference, :mod:`flowcut_kernels.ops.library`) runs everywhere. The optional backends
("triton", "native") register themselves when their module imports; one whose import fails is
unavailable, with its reason in :func:`available_backends` ``(device, reasons=True)``.
"""

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..checks import require
from . import autograd, library  # noqa: F401 - library defines the reference ops registered below



#: Every floating dtype the ops take; a backend may take fewer (Triton declines float64).
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: The ops a backend may provide, by name: ``torch.ops.flowcut.<prefix><name>`` for the backend's prefix.
OPS = (
    "flow_scores", "select_gather", "flow_scores_varlen", "select_gather_varlen",
    "attention_scores", "text_guided_scores", "topk_select", "merge_nearest",
)


@dataclass(frozen=True)
class Backend:
    """A backend: its torch ops by name (those of :data:`OPS` it provides), the device types and input dtypes
    it takes."""

    name: str
    ops: Mapping[str, Callable]
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES

    @classmethod
    def from_library(cls, name: str, prefix: str, device_types, dtypes=ALL_DTYPES) -> "Backend":
        """The backend of every ``torch.ops.flowcut.<prefix><op>`` registered, for the ops of :data:`OPS`."""
        found = {op: getattr(torch.ops.flowcut, prefix + op) for op in OPS if hasattr(torch.ops.flowcut, prefix + op)}
        return cls(name, found, tuple(device_types), tuple(dtypes))


BACKENDS: dict[str, Backend] = {}
UNAVAILABLE: dict[str, str] = {}  # backend name -> why it could not be loaded
#: (backend name, device type) -> why the backend was built without kernels for that device type; the first
#: :func:`resolve_backend` for such a device warns once with it.
MISSING_DEVICES: dict[tuple[str, str], str] = {}
_WARNED: set[tuple[str, str]] = set()
#: (backend asked for, device type, dtype, op) -> the torch op it resolved to (:func:`op_for`); cleared whenever
#: the registry changes.
_RESOLVED: dict[tuple, Callable] = {}
# "auto" takes the first backend in this order that runs on the device type and takes the dtype.
_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
_OPTIONAL = {"triton": "flowcut_kernels.ops.triton", "native": "flowcut_kernels.ops.native"}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable by name (backend modules call this when they load); its ops get the
    gradients of :mod:`.autograd`."""
    autograd.attach(backend)
    BACKENDS[backend.name] = backend
    UNAVAILABLE.pop(backend.name, None)
    _RESOLVED.clear()


def mark_unavailable(name: str, reason: str) -> None:
    """Record why backend ``name`` cannot be used (a backend module that loads but cannot run calls this)."""
    BACKENDS.pop(name, None)
    UNAVAILABLE[name] = reason
    _RESOLVED.clear()


def mark_missing_device(name: str, device_type: str, reason: str) -> None:
    """Record why backend ``name`` has no kernels for ``device_type`` (e.g. built without CUDA): the reason
    :func:`available_backends` gives there, and a warning on the first use of such a device."""
    MISSING_DEVICES[(name, device_type)] = reason
    _RESOLVED.clear()


def _warn_missing_devices(device_type: str) -> None:
    for key, reason in MISSING_DEVICES.items():
        if key[1] == device_type and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"flowcut_kernels: the {key[0]!r} backend has no {device_type.upper()} kernels: {reason}",
                          stacklevel=4)


def load_optional_backends() -> None:
    """Import the optional backend modules; a failure makes the backend unavailable, with its reason."""
    for name, module in _OPTIONAL.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any failure only disables this backend
            UNAVAILABLE[name] = f"{module} failed to load: {type(error).__name__}: {error}"


register_backend(Backend.from_library("torch", "", ("cpu", "cuda")))


def known_backends() -> list[str]:
    """Every backend name, available or not."""
    return sorted(set(BACKENDS) | set(UNAVAILABLE))


def _order(device_type: str) -> list[str]:
    known = _AUTO_ORDER.get(device_type, ("torch",))
    return list(known) + sorted(set(BACKENDS) - set(known))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_backends(
    device: torch.device | str, *, dtype: torch.dtype | None = None, op: str | tuple[str, ...] = (),
    reasons: bool = False,
) -> list[str] | dict[str, str | None]:
    """The backends that run on ``device`` (and take ``dtype`` inputs and provide the ops ``op``, if asked),
    fastest first.

    "auto" takes the first. "torch" (the reference) runs everywhere. With ``reasons=True``, a dict of
    every known backend name to None (available) or the reason it is not available.
    """
    device_type = torch.device(device).type  # also rejects a malformed device string

    def why_not(name: str) -> str | None:
        if name in UNAVAILABLE:
            return UNAVAILABLE[name]
        backend = BACKENDS[name]
        if (name, device_type) in MISSING_DEVICES:
            return f"has no {device_type.upper()} kernels: {MISSING_DEVICES[(name, device_type)]}"
        if device_type not in backend.device_types:
            return f"runs on {'/'.join(backend.device_types)} tensors, not {device_type}"
        if dtype is not None and dtype not in backend.dtypes:
            return f"does not take {_dtype_name(dtype)} inputs (it takes {', '.join(map(_dtype_name, backend.dtypes))})"
        missing = [name for name in ((op,) if isinstance(op, str) else op) if name not in backend.ops]
        if missing:
            return f"has no {', '.join(missing)} op"
        return None

    names = [n for n in _order(device_type) if n in BACKENDS] + sorted(UNAVAILABLE)
    if reasons:
        return {name: why_not(name) for name in names}
    return [name for name in names if why_not(name) is None]


def resolve_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype | None = None, op: str | tuple[str, ...] = ()
) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device`` for ``dtype`` inputs, providing
    the ops ``op``.

    An unknown name, or one that cannot run here, is a FlowCutInputError that says why and lists the choices.
    """
    require(isinstance(backend, str), f"backend must be a str, got {type(backend).__name__}")
    _warn_missing_devices(torch.device(device).type)
    usable = available_backends(device, dtype=dtype, op=op)
    if backend == "auto":
        return usable[0]
    require(
        backend in BACKENDS or backend in UNAVAILABLE,
        f"backend={backend!r} is unknown; the known backends are {known_backends()} (or 'auto')",
    )
    if backend not in usable:
        why = available_backends(device, dtype=dtype, op=op, reasons=True)[backend]
        require(False, f"backend={backend!r} is not available on {torch.device(device)} ({why}); choose 'auto' or one "
                       f"of {usable}")
    return backend


def op_for(name: str, backend: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The torch op ``name`` of the backend ``backend`` ("auto" or a name) resolves to on ``device`` for ``dtype``
    inputs: :func:`resolve_backend` once per (backend, device, dtype, op), then a dict lookup."""
    key = (backend, device, dtype, name)
    try:
        return _RESOLVED[key]
    except (KeyError, TypeError):  # TypeError: an unhashable backend, refused by resolve_backend
        op = BACKENDS[resolve_backend(backend, device, dtype, name)].ops[name]
        _RESOLVED[key] = op
        return op


def unchecked(name: str, backend: str) -> Callable:
    """The torch op ``name`` of the resolved backend ``backend``, to call without the public functions' checks.

    For the package's own loops, which resolved the backend once (:func:`resolve_backend`) and build the ops'
    inputs themselves (e.g. cu_seqlens of known lengths, so no check needs to read it back); anything else calls
    the public functions of :mod:`flowcut_kernels.ops`.
    """
    return BACKENDS[backend].ops[name]

"""Input checks shared by the ops and the model layer: each failure names the argument and the fix."""

from __future__ import annotations

import numbers
from typing import NoReturn

import torch
from torch import Tensor

#: Floating dtypes the ops and models take (a backend may take fewer: see ``ops.available_backends``).
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FlowCutInputError(ValueError, TypeError, RuntimeError):
    """Bad input to a flowcut_kernels call: the message names the argument and the fix.

    It subclasses ValueError, TypeError and RuntimeError, so code that catches the standard
    exception for a bad value, a wrong type or a device mismatch catches it too.
    """


def require(ok: bool, message: str) -> None:
    """Raise a :class:`FlowCutInputError` with ``message`` unless ``ok`` (for messages that cost nothing to build;
    hot paths test first and call :func:`fail`)."""
    if not ok:
        raise FlowCutInputError(message)


def fail(message: str) -> NoReturn:
    raise FlowCutInputError(message)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """An integer (not a bool) in [low, high]."""
    if type(value) is not int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            fail(f"{name} must be an int, got {type(value).__name__}")
        value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        fail(f"{name}={value} is out of range: it must be {bound}")
    return value


def check_tensor(name: str, t, ndim: int, dtypes: tuple[torch.dtype, ...], shape_doc: str) -> Tensor:
    """A tensor with ``ndim`` dims and one of ``dtypes``; ``shape_doc`` spells the expected shape."""
    if not isinstance(t, Tensor):
        fail(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        fail(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(f"{name} has dtype {t.dtype}; expected {names} (convert it with .to(...))")
    return t


def check_same_device(**tensors: Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    device = first_name = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first_name = t.device, name
        elif t.device != device:
            fail(f"{name} is on {t.device} but {first_name} is on {device}; move them to one device")
    return device

"""Input checks shared by the ops and the model layer: each failure names the argument and the fix."""

from __future__ import annotations

import numbers

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
    if not ok:
        raise FlowCutInputError(message)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """An integer (not a bool) in [low, high]."""
    require(
        isinstance(value, numbers.Integral) and not isinstance(value, bool),
        f"{name} must be an int, got {type(value).__name__}",
    )
    value = int(value)
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    require(low <= value and (high is None or value <= high), f"{name}={value} is out of range: it must be {bound}")
    return value


def check_tensor(name: str, t, ndim: int, dtypes: tuple[torch.dtype, ...], shape_doc: str) -> Tensor:
    """A tensor with ``ndim`` dims and one of ``dtypes``; ``shape_doc`` spells the expected shape."""
    require(isinstance(t, Tensor), f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    require(t.dim() == ndim, f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    require(t.dtype in dtypes, f"{name} has dtype {t.dtype}; expected {names} (convert it with .to(...))")
    return t


def check_same_device(**tensors: Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    given = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(given.items()))
    for name, t in given.items():
        require(
            t.device == first.device,
            f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device",
        )
    return first.device

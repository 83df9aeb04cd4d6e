"""Counting host reads: every point where Python waits on tensor data (a device-to-host sync on a GPU).

:class:`HostReads` counts, while active, the ops that hand data to the host: aten's ``_local_scalar_dense``
(``item``, ``int()``, ``bool()``…), the ops whose output size is data-dependent (``nonzero``, ``masked_select``,
``unique``…) and any op whose schema returns Python ints from tensors (``flowcut::prune_count``); and the Python
calls that copy a tensor to the host (``tolist``, ``cpu``, ``numpy``) of tensors not on the CPU — or of every tensor
when ``cpu_counts`` (a CPU-only machine standing in for a GPU: the same calls would sync there). Each read is
recorded with the Python line that made it.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::repeat_interleave",
}


class HostReads(TorchDispatchMode):
    def __init__(self, cpu_counts: bool = True):
        super().__init__()
        self.cpu_counts = cpu_counts
        self.reads: list[str] = []
        self._patched = {}

    def _where(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "host_reads.py" not in f.filename
                  and "/torch/" not in f.filename]
        frame = frames[-1] if frames else None
        self.reads.append(f"{what} at {frame.filename}:{frame.lineno}" if frame else what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        name = schema.name
        returns_ints = any(str(r.type) in ("int", "SymInt", "int[]", "SymInt[]") for r in schema.returns) and any(
            "Tensor" in str(a.type) for a in schema.arguments
        )
        if (name in _DATA_DEPENDENT or returns_ints) and not (
            name == "aten::repeat_interleave" and (kwargs or {}).get("output_size")
        ):
            self._where(name)
        return func(*args, **(kwargs or {}))

    def _counts(self, tensor) -> bool:
        return self.cpu_counts or tensor.device.type != "cpu"

    def __enter__(self):
        mode = self
        for method in ("tolist", "cpu", "numpy"):
            real = getattr(torch.Tensor, method)
            self._patched[method] = real

            def wrapper(tensor, *args, _real=real, _method=method, **kwargs):
                if mode._counts(tensor):
                    mode._where(f"Tensor.{_method}")
                return _real(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, real in self._patched.items():
            setattr(torch.Tensor, method, real)
        return super().__exit__(*exc)

    def __len__(self) -> int:
        return len(self.reads)

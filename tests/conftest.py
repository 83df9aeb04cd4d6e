import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU through the interpreter; it must be set before triton is
# imported (importing torch does not import it). With a GPU they are compiled, as users run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from flowcut_kernels import available_backends  # noqa: E402
from flowcut_kernels.bench.random_models import random_clip_vision  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

CPU_BACKENDS = available_backends("cpu")


@pytest.fixture
def tiny_clip():
    """Factory of seeded tiny CLIP vision models with sharpened attention (progressive pruning)."""

    def make(seed=0, sharpen=8.0, **overrides):
        return random_clip_vision("tiny", seed=seed, sharpen=sharpen, **overrides)

    return make


class TensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (to show no S×S tensor is built)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state, so a failure reproduces (tests also seed their own
    generators where the values matter)."""
    torch.manual_seed(0)


def assert_same_bits_on_one_and_two_threads(run):
    """``run()`` (a tuple of tensors) gives the same bits on one thread and on two (or the usual count if more)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, many, strict=True):
        assert torch.equal(x, y)

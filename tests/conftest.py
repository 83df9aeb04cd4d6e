import os

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from flowcut_kernels import available_backends, synthetic  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

CPU_BACKENDS = available_backends("cpu")


@pytest.fixture
def tiny_clip():
    """Factory of seeded tiny CLIP vision models with sharpened attention (progressive pruning)."""

    def make(seed=0, sharpen=8.0, **overrides):
        return synthetic.random_clip_vision("tiny", seed=seed, sharpen=sharpen, **overrides)

    return make

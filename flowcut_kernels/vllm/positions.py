"""M-RoPE positions of prompts holding K_b placeholders per image, before and after the tower ran (docs/vllm.md).

vLLM computes a request's positions when it is scheduled, before the encoder runs, so the kept groups are unknown
then: :func:`prompt_positions` gives the text its final positions (counted on from the unpruned sequence: after an
image of LLM grid (t, h', w') starting at p, text goes on at p + max(t, h', w')) and each image placeholder p. In
each step that holds image tokens, :func:`with_kept` adds the offsets the tower appended to each kept token's
embedding: (p + t, p + h, p + w). The stored positions never change, so a prefill chunk (or a prefill run again after
a preemption) gets the same positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prompt_positions(length: int, images: list[tuple[int, int, tuple[int, int, int]]]) -> tuple[Tensor, int]:
    """Positions (3, length) int64 and the decode delta (next position − length) of a prompt.

    Args:
        images: per image, in prompt order, (offset of its first placeholder, its placeholders K_b, its LLM grid
            (t, h', w')).
    """
    positions = torch.empty(3, length, dtype=torch.long)
    current, start = 0, 0
    for offset, count, (t, h, w) in images:
        positions[:, start:offset] = torch.arange(current, current + offset - start)
        base = current + offset - start
        positions[:, offset:offset + count] = base
        current, start = base + max(t, h, w), offset + count
    positions[:, start:] = torch.arange(current, current + length - start)
    return positions, current - start  # the next position is current + length - start


def with_kept(positions: Tensor, slots: Tensor, offsets: Tensor) -> Tensor:
    """One step's positions (3, T) with each kept token at its image's first position + its group's offsets.

    Args:
        slots: (R,) the step's image-token rows; offsets: (R, 3) their kept groups' (t, h, w) offsets
            (:func:`.tower.group_positions`). ``positions`` is not modified.
    """
    positions = positions.clone()
    positions[:, slots] += offsets.T.to(positions.dtype)
    return positions

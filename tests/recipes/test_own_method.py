"""Two more methods on the public API, each a few lines of glue: a custom per-token score on a ragged batch, and
a custom policy in the pruned-encoder loop (on one schedule and per image), each against plain PyTorch."""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import encode, ops
from flowcut_kernels.bench.random_models import random_clip_vision, random_pixels
from flowcut_kernels.models.policy import LayerView


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_score_on_a_ragged_batch(backend):
    """Keep the half of each image's tokens with the largest norm, merge the rest into their nearest kept token."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 12, 3]
    hidden = torch.randn(sum(lengths), 8, generator=g)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    # --- the glue ---
    scores = hidden.norm(dim=-1)
    selection = ops.topk_select(scores, [n // 2 for n in lengths], cu_seqlens=cu, backend=backend)
    merged, sizes = ops.merge_nearest(hidden, hidden, selection, backend=backend)
    # --- plain PyTorch, image by image ---
    start = 0
    for b, n in enumerate(lengths):
        part = hidden[start : start + n]
        order = part.norm(dim=-1).sort(descending=True, stable=True).indices
        kept, dropped = order[: n // 2].sort().values, order[n // 2 :].sort().values
        unit = torch.nn.functional.normalize(part, dim=-1)
        target = (unit[dropped] @ unit[kept].T).argmax(-1)
        total = part[kept].index_add(0, target, part[dropped])
        count = torch.ones(len(kept)).index_add(0, target, torch.ones(len(dropped)))
        rows = slice(int(selection.kept_cu[b]), int(selection.kept_cu[b + 1]))
        assert torch.equal(selection.kept[rows] - start, kept)
        torch.testing.assert_close(merged[rows], total / count[:, None])
        torch.testing.assert_close(sizes[rows], count)
        start += n


class CLSAttentionPolicy:
    """Prune once, after layer ``at``, to the ``target`` patches the CLS row attends to most."""

    def __init__(self, target: int, at: int):
        self.target, self.at = target, at

    def plan(self, index, steps_left, lengths):
        return index == self.at, index == self.at

    def step(self, layer: LayerView):
        if layer.cu_seqlens is None:  # dense: (B, H, S, D)
            scores = ops.attention_scores(layer.q[:, :, :1], layer.k, scale=layer.scale, span=(1, layer.k.shape[2]),
                                          backend=layer.backend)
            return scores, [self.target + 1]
        scores = [ops.attention_scores(layer.q[b : b + 1, :, :1], layer.k[a:e].transpose(0, 1)[None],
                                       scale=layer.scale, span=(1, e - a), backend=layer.backend)[0]
                  for b, (a, e) in enumerate(zip(layer.cu_seqlens.tolist(), layer.cu_seqlens.tolist()[1:]))]
        return torch.cat(scores), [self.target + 1] * len(layer.lengths)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("schedule", ["batch", "per_image"])
def test_custom_policy_in_the_encoder_loop(backend, schedule):
    model = random_clip_vision("tiny", seed=2, sharpen=8.0, attn_implementation="eager")
    pixels = random_pixels(model, 2, seed=2)
    with torch.no_grad():
        got = encode(model, pixels, 12, feature_layer=-2, schedule=schedule, backend=backend,
                     policy=CLSAttentionPolicy(12, at=1))
        stock = model(pixels, output_hidden_states=True, output_attentions=True)
        attention = stock.attentions[1][:, :, 0, 1:].mean(1)  # layer 1's CLS row, head mean
        keep = attention.sort(dim=-1, descending=True, stable=True).indices[:, :12].sort(dim=-1).values
    assert torch.equal(got.keep_indices, keep)
    assert got.tokens_per_layer == [65, 65, 13, 13, 13] or got.tokens_per_layer == [[65, 65, 13, 13, 13]] * 2

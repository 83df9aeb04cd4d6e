"""VisionZip on the primitives equals a plain-PyTorch VisionZip on the eager attention matrix."""

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels.bench.random_models import random_clip_vision, random_pixels
from flowcut_kernels.models.attention import capturing
from flowcut_kernels.models.registry import find_tower
from flowcut_kernels.recipes.visionzip import visionzip


def plain_visionzip(model, pixels, feature, dominant, contextual):
    """VisionZip as its authors write it: the CLS row of the eager attention, top-k, one-hot merge."""
    out = model(pixels, output_hidden_states=True, output_attentions=True)
    hidden, attention = out.hidden_states[feature + 1], out.attentions[feature]  # (B, S, C), (B, H, S, S)
    layer = find_tower(model).layers[feature]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[feature]))
    keys = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)[:, 1:]  # head-mean keys (B, N, D)
    patches = hidden[:, 1:]
    order = attention[:, :, 0, 1:].mean(1).sort(dim=-1, descending=True, stable=True).indices
    top = order[:, :dominant].sort(dim=-1).values
    rest = order[:, dominant:].sort(dim=-1).values
    take = lambda x, i: x.gather(1, i[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    rest_hidden, rest_keys = take(patches, rest), torch.nn.functional.normalize(take(keys, rest), dim=-1)
    step = max(1, rest.shape[1] // contextual)
    target = torch.arange(0, rest.shape[1], step)[:contextual]
    other = torch.ones(rest.shape[1], dtype=torch.bool)
    other[target] = False
    similarity = rest_keys[:, other] @ rest_keys[:, target].transpose(1, 2)
    one_hot = torch.zeros_like(similarity).scatter_(2, similarity.argmax(2, keepdim=True), 1.0)
    counts = one_hot.sum(1).clamp(min=1)[..., None]
    joined = one_hot.transpose(1, 2) @ rest_hidden[:, other] / counts
    return torch.cat([take(patches, top), rest_hidden[:, target] + joined], dim=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_visionzip_equals_the_plain_version(backend):
    model = random_clip_vision("tiny", seed=1, sharpen=8.0, attn_implementation="eager")
    pixels = random_pixels(model, 2, seed=1)
    feature = 4  # LLaVA's layer −2 of 6
    with torch.no_grad():
        want = plain_visionzip(model, pixels, feature, dominant=10, contextual=4)
        # The glue: the feature layer's output, and its q and k through the attention seam.
        layer = find_tower(model).layers[feature]
        with capturing(model.config) as seen:
            seen.watch = layer.self_attn
            hidden = model(pixels, output_hidden_states=True).hidden_states[feature + 1]
        q, k, _, scale = seen.seen
        got = visionzip(hidden, q, k, scale=scale, dominant=10, contextual=4, backend=backend)
    assert got.shape == (2, 14, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


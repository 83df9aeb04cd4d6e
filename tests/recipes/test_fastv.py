"""FastV on the primitives equals a plain-PyTorch FastV on the eager attention matrix (tiny Llama, GQA)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from conftest import CPU_BACKENDS
from flowcut_kernels.recipes.fastv import fastv_prefill

IMAGE, KEEP, LAYER = (3, 19), 6, 2


def tiny_llama(implementation):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=implementation)
    return LlamaModel(config).eval()


def plain_fastv(model, embeds):
    """FastV as written out: layers with an explicit causal mask, the eager attention of layer K − 1's last row."""
    def causal(n):
        return torch.full((n, n), float("-inf")).triu(1)[None, None]

    hidden, positions = embeds, torch.arange(embeds.shape[1])[None].expand(embeds.shape[0], -1)
    for i, block in enumerate(model.layers):
        weights = []
        handle = block.self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
        hidden = block(hidden, attention_mask=causal(hidden.shape[1]), position_ids=positions,
                       position_embeddings=model.rotary_emb(hidden, positions))
        handle.remove()
        if i == LAYER - 1:
            scores = weights[0][:, :, -1, IMAGE[0] : IMAGE[1]].mean(1)  # (B, image tokens)
            best = scores.sort(dim=-1, descending=True, stable=True).indices[:, :KEEP] + IMAGE[0]
            text = torch.tensor([j for j in range(hidden.shape[1]) if not IMAGE[0] <= j < IMAGE[1]])
            rows = torch.cat([text.expand(len(best), -1), best], 1).sort(dim=-1).values
            hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = positions.gather(1, rows)
    return model.norm(hidden)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fastv_equals_the_plain_version(backend):
    embeds = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain_fastv(tiny_llama("eager"), embeds)
        got = fastv_prefill(tiny_llama("sdpa"), embeds, IMAGE, KEEP, layer=LAYER, backend=backend)
    assert got.shape == (2, 24 - (IMAGE[1] - IMAGE[0]) + KEEP, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

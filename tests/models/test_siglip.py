"""FlowCut on SigLIP vision towers: the mean-query variant (no CLS row), encode and the patched model."""

import copy

import pytest
import torch

from conftest import CPU_BACKENDS, TensorShapes
from flowcut_kernels import FlowCutInputError, FlowCutVisionOutput, encode, flowcut, remove_flowcut
from flowcut_kernels.bench.random_models import random_pixels, random_siglip_vision
from flowcut_kernels.models.registry import find_tower
from oracle.llava import find_siglip_tower, naive_siglip_encode

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# SigLIP has no pre-layernorm, so a sharper tower drifts further between float32 and the float64 oracle;
# factor 4 already prunes progressively (64 → 55 → 29 → T on 6 layers).
SHARPEN = 4.0


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def tiny_siglip(seed=0, **overrides):
    return random_siglip_vision("tiny", seed=seed, sharpen=SHARPEN, **overrides)


def test_find_tower_uses_the_mean_variant():
    tower = find_tower(tiny_siglip())
    assert tower.has_cls is False and tower.num_patches == 64 and len(tower.layers) == 6


def _check_against_oracle(batch, seed, feature_layer, target, backend):
    model = tiny_siglip(seed)
    pixels = random_pixels(model, batch, seed=seed)
    got = encode(model, pixels, target, feature_layer=feature_layer, backend=backend)
    features, keep_indices, tokens = naive_siglip_encode(model, pixels, target, feature_layer)

    assert got.tokens_per_layer == tokens and tokens[0] == 64 and tokens[-1] == target
    assert got.features.shape == (batch, target, 32) and got.features.dtype == torch.float32
    assert torch.equal(got.keep_indices, keep_indices)
    torch.testing.assert_close(got.features.double(), features, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("batch,seed", [(1, 0), (3, 1)])
@pytest.mark.parametrize("feature_layer", [-1, -2, -4])
@pytest.mark.parametrize("target", [1, 8, 30])
def test_encode_matches_eager_oracle(batch, seed, feature_layer, target):
    _check_against_oracle(batch, seed, feature_layer, target, "auto")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_runs_the_mean_variant(backend):
    _check_against_oracle(3, 2, -2, 10, backend)


def test_bf16_tower_takes_the_mean_relay_in_float32(monkeypatch):
    """The relay of a bf16 SigLIP tower is the float32 mean of its bf16 queries (a bf16 mean moves the kept set)."""
    from flowcut_kernels import ops

    seen = []
    real = ops.flow_scores
    monkeypatch.setattr(ops, "flow_scores", lambda q_relay, *a, **k: seen.append(q_relay) or real(q_relay, *a, **k))
    model = tiny_siglip(3, dtype=torch.bfloat16)
    queries = []
    for layer in find_tower(model).layers:
        layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: queries.append(out))
    encode(model, random_pixels(model, 2, seed=3), 8)
    assert seen and all(q.dtype == torch.float32 for q in seen)
    for q_relay, q in zip(seen, queries):  # each scored layer's relay against its own queries
        want = q.double().view(*q.shape[:2], *q_relay.shape[1:]).mean(dim=1)
        torch.testing.assert_close(q_relay.double(), want, rtol=1e-6, atol=1e-6)


def test_schedule_prunes_progressively():
    model = tiny_siglip()
    out = encode(model, random_pixels(model, 2), 8)
    tokens = out.tokens_per_layer  # 6 layers, F = 5: prune steps after layers 0, 2, 4 (steps left 4, 2, 0)
    assert tokens[0] == 64 and tokens[-1] == 8
    assert 64 > tokens[1] > tokens[3] > 8
    keep = out.keep_indices
    assert (keep[:, 1:] > keep[:, :-1]).all() and keep.min() >= 0 and keep.max() < 64


def test_patched_forward_post_layernorm_and_head():
    model = tiny_siglip()
    pixels = random_pixels(model, 3)
    want = encode(model, pixels, 8)
    assert flowcut(model, 8) is model
    out = model(pixels, output_hidden_states=True)
    tower = find_siglip_tower(model)
    assert isinstance(out, FlowCutVisionOutput) and out.last_hidden_state.shape == (3, 8, 32)
    torch.testing.assert_close(out.last_hidden_state, tower.post_layernorm(want.features), rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output, tower.head(out.last_hidden_state), rtol=0, atol=0)
    assert torch.equal(out.keep_indices, want.keep_indices) and out.tokens_per_layer == want.tokens_per_layer
    assert len(out.hidden_states) == 7 and [h.shape[1] for h in out.hidden_states[1:]] == out.tokens_per_layer
    assert torch.equal(out.hidden_states[-1], want.features)  # raw layer output, like stock hidden_states
    as_tuple = model(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


def test_patched_forward_feature_layer_and_no_head():
    model = tiny_siglip(vision_use_head=False)
    pixels = random_pixels(model, 2)
    flowcut(model, 12, feature_layer=-3)
    ran = []
    for i, layer in enumerate(find_siglip_tower(model).encoder.layers):  # pruning steps call the layer's parts
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    out = model(pixels)
    assert ran == [0, 1, 2, 3] and out.pooler_output is None
    assert out.last_hidden_state.shape == (2, 12, 32) and len(out.tokens_per_layer) == 4


def test_per_instance_reversible_and_deepcopy():
    patched, other = tiny_siglip(seed=1), tiny_siglip(seed=1)
    pixels = random_pixels(patched, 2)
    before = patched(pixels)
    attrs = dict(vars(patched))
    class_forward = type(patched).forward

    flowcut(patched, 8)
    clone = copy.deepcopy(patched)
    assert patched(pixels).last_hidden_state.shape == (2, 8, 32)
    assert type(patched).forward is class_forward
    assert torch.equal(other(pixels).last_hidden_state, before.last_hidden_state)

    remove_flowcut(patched)
    assert vars(patched).keys() == attrs.keys() and all(vars(patched)[k] is v for k, v in attrs.items())
    after = patched(pixels)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.pooler_output, before.pooler_output)
    assert clone(pixels).last_hidden_state.shape == (2, 8, 32)  # the copy keeps its own patch
    remove_flowcut(clone)
    assert torch.equal(clone(pixels).last_hidden_state, before.last_hidden_state)




def test_never_builds_the_attention_matrix():
    model = tiny_siglip()
    pixels = random_pixels(model, 2)
    with TensorShapes() as seen:
        out = encode(model, pixels, 10)  # no token count equals the 8×8 patch grid of the embedding
    tokens = set(out.tokens_per_layer)
    # (B, H, S, S) per-head attention; 3-d (B, 64, 64) tensors are the MLP's (intermediate size 64)
    assert [s for s in seen.shapes if len(s) == 4 and s[-1] == s[-2] and s[-1] in tokens] == []
    eager = tiny_siglip(attn_implementation="eager")  # the detector does see the eager model's matrix
    with TensorShapes() as seen:
        encode(eager, pixels, 10)
    assert [s for s in seen.shapes if len(s) == 4 and s[-1] == s[-2] == 64]


def test_bad_input():
    model = tiny_siglip()
    pixels = random_pixels(model, 1)
    with pytest.raises(FlowCutInputError, match="target_num=64 is out of range"):
        encode(model, pixels, 64)
    with pytest.raises(FlowCutInputError, match="target_num=64 is out of range"):
        flowcut(model, 64)
    assert "forward" not in vars(model)
    flowcut(model, 8)
    with pytest.raises(FlowCutInputError, match="output_attentions"):
        model(pixels, output_attentions=True)
    with pytest.raises(FlowCutInputError, match="pixel_values has dtype torch.uint8: raw image values"):
        model((pixels * 255).to(torch.uint8))

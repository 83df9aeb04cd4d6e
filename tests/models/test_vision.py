"""flowcut() / remove_flowcut() on HF CLIP vision models: per instance, reversible, same flow as encode."""

import copy

import pytest
import torch
from flowcut_kernels import FlowCutInputError, FlowCutVisionOutput, encode, flowcut, remove_flowcut
from flowcut_kernels.bench.random_models import random_pixels


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.__dict__)


def test_patched_forward_equals_encode(tiny_clip):
    model = tiny_clip()
    pixels = random_pixels(model, 3)
    want = encode(model, pixels, 8, feature_layer=-2)
    assert flowcut(model, 8, feature_layer=-2) is model
    out = model(pixels)
    assert isinstance(out, FlowCutVisionOutput)
    assert out.last_hidden_state.shape == (3, 9, 32)
    torch.testing.assert_close(out.last_hidden_state[:, 1:], want.features, rtol=0, atol=0)
    assert torch.equal(out.keep_indices, want.keep_indices)
    assert out.tokens_per_layer == want.tokens_per_layer
    tower = model.vision_model if hasattr(model, "vision_model") else model
    torch.testing.assert_close(out.pooler_output, tower.post_layernorm(out.last_hidden_state[:, 0]))


def test_default_feature_layer_is_last_and_hidden_states(tiny_clip):
    model = flowcut(tiny_clip(), 8)
    pixels = random_pixels(model, 2)
    out = model(pixels, output_hidden_states=True)
    assert len(out.tokens_per_layer) == 6  # all 6 layers ran, the last one is the feature layer
    assert len(out.hidden_states) == 7  # embeddings + each layer's output, before its pruning
    assert [h.shape[1] for h in out.hidden_states[1:]] == out.tokens_per_layer
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    as_tuple = model(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


def test_with_projection(tiny_clip):
    model = flowcut(tiny_clip(with_projection=True), 8)
    pixels = random_pixels(model, 2)
    out = model(pixels)
    assert out.image_embeds.shape == (2, 16) and out.keep_indices.shape == (2, 8)
    pooled = model.vision_model.post_layernorm(out.last_hidden_state[:, 0])
    torch.testing.assert_close(out.image_embeds, model.visual_projection(pooled))


def test_per_instance_and_reversible(tiny_clip):
    patched, other = tiny_clip(seed=1), tiny_clip(seed=1)
    pixels = random_pixels(patched, 2)
    before = patched(pixels)
    class_forward = type(patched).forward

    flowcut(patched, 8)
    assert patched(pixels).last_hidden_state.shape == (2, 9, 32)
    untouched = other(pixels)  # same class, not patched: full sequence, identical to before
    assert type(patched).forward is class_forward
    assert torch.equal(untouched.last_hidden_state, before.last_hidden_state)

    assert remove_flowcut(patched) is patched
    after = patched(pixels)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.pooler_output, before.pooler_output)
    assert not hasattr(patched, "flowcut_config") and "forward" not in patched.__dict__
    assert remove_flowcut(patched) is patched  # removing twice is a no-op


def test_reapply_changes_target_and_deepcopy(tiny_clip):
    model = tiny_clip()
    pixels = random_pixels(model, 1)
    flowcut(model, 8)
    flowcut(model, 20, feature_layer=-3)
    out = model(pixels)
    assert out.keep_indices.shape == (1, 20) and len(out.tokens_per_layer) == 4
    clone = copy.deepcopy(model)
    assert torch.equal(clone(pixels).keep_indices, out.keep_indices)
    remove_flowcut(model)
    assert model(pixels).last_hidden_state.shape == (1, 65, 32)
    assert clone(pixels).keep_indices.shape == (1, 20)  # the copy keeps its own patch


def test_output_attentions_is_refused(tiny_clip):
    model = flowcut(tiny_clip(), 8)
    with pytest.raises(FlowCutInputError, match="output_attentions"):
        model(random_pixels(model, 1), output_attentions=True)


def test_interpolated_resolution(tiny_clip):
    model = flowcut(tiny_clip(), 8)
    big = torch.randn(1, 3, 48, 48)  # 12×12 = 144 patches
    out = model(big, interpolate_pos_encoding=True)
    assert out.keep_indices.shape == (1, 8) and out.tokens_per_layer[0] == 145
    assert out.keep_indices.max() < 144


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_num=0), "target_num=0 is out of range"),
        (dict(target_num=64), "target_num=64 is out of range"),
        (dict(target_num=8, feature_layer=-6), "feature_layer=-6 is out of range"),
        (dict(target_num=8, feature_layer=3), "feature_layer=3 is out of range"),
        (dict(target_num=8, backend="fast"), "backend='fast'"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(tiny_clip, kwargs, match):
    model = tiny_clip()
    weights, attrs = _state(model)
    with pytest.raises(FlowCutInputError, match=match):
        flowcut(model, **kwargs)
    assert model.__dict__ == attrs and not hasattr(model, "flowcut_config")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # and a patched model keeps its settings when a re-apply is refused
    flowcut(model, 8)
    with pytest.raises(FlowCutInputError):
        flowcut(model, **kwargs)
    assert model.flowcut_config.target_num == 8


def test_unsupported_models_are_refused():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = CLIPTextModel(config)
    for model in (text, torch.nn.Linear(2, 2)):
        with pytest.raises(FlowCutInputError, match=f"model is a {type(model).__name__}.*CLIPVisionModel"):
            flowcut(model, 8)
        assert "forward" not in model.__dict__


def test_wrong_pixels_on_patched_model(tiny_clip):
    model = flowcut(tiny_clip(), 8)
    with pytest.raises(FlowCutInputError, match="pixel_values must have shape"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(FlowCutInputError, match="pixel_values is required"):
        model()

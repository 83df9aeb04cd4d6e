"""flowcut_kernels.encode against the eager re-implementation of the whole flow (naive_encode)."""

import pytest
import torch

from conftest import CPU_BACKENDS, TensorShapes
from flowcut_kernels import FlowCutInputError, encode
from flowcut_kernels.bench.random_models import random_clip_vision, random_pixels, random_siglip_vision
from oracle.flowcut import naive_encode

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch,seed", [(1, 0), (3, 1)])
@pytest.mark.parametrize("feature_layer", [-1, -2, -4])
@pytest.mark.parametrize("target", [1, 8, 30])
def test_encode_matches_eager_oracle_fp32(tiny_clip, backend, batch, seed, feature_layer, target):
    model = tiny_clip(seed=seed)
    pixels = random_pixels(model, batch, seed=seed)
    got = encode(model, pixels, target, feature_layer=feature_layer, backend=backend)
    features, keep_indices, tokens = naive_encode(model, pixels, target, feature_layer)

    assert got.tokens_per_layer == tokens
    assert got.features.shape == (batch, target, 32) and got.features.dtype == torch.float32
    assert got.keep_indices.dtype == torch.int64
    assert torch.equal(got.keep_indices, keep_indices)
    torch.testing.assert_close(got.features.double(), features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", *(b for b in CPU_BACKENDS if b != "triton")])
def test_float64_model_matches_the_oracle_exactly(tiny_clip, backend):
    """A float64 tower (how one checks fidelity) is pruned in float64: features equal the oracle's to 1e-10."""
    model = tiny_clip(seed=4).double()
    pixels = random_pixels(model, 2, seed=4).double()
    got = encode(model, pixels, 8, feature_layer=-2, backend=backend)
    features, keep_indices, tokens = naive_encode(model, pixels, 8, -2)
    assert got.features.dtype == torch.float64 and got.tokens_per_layer == tokens
    assert torch.equal(got.keep_indices, keep_indices)
    torch.testing.assert_close(got.features, features, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_attention_seam_is_per_run_and_restored(tiny_clip, implementation, monkeypatch):
    """encode selects the "flowcut" attention on this instance only while it runs, even when it fails."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from flowcut_kernels.models import attention

    model, other = tiny_clip(seed=5, attn_implementation=implementation), tiny_clip(seed=6)
    pixels = random_pixels(model, 1, seed=5)
    inside = []
    real = attention.flowcut_attention
    monkeypatch.setitem(
        ALL_ATTENTION_FUNCTIONS._global_mapping, attention.NAME,
        lambda module, *a, **k: inside.append((module.config._attn_implementation, other.config._attn_implementation))
        or real(module, *a, **k),
    )
    encode(model, pixels, 8)
    assert inside and set(inside) == {("flowcut", "sdpa")}
    assert model.config._attn_implementation == implementation
    monkeypatch.setattr("flowcut_kernels.ops.prune_counts", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        encode(model, pixels, 8)
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_per_image_schedule_equals_separate_calls(tiny_clip, backend, vision):
    """encode(schedule="per_image") on 4 images = 4 encode calls of one image (one pass, padded and masked)."""
    if vision == "clip":
        model = tiny_clip(seed=8)
    else:
        model = random_siglip_vision("tiny", seed=8, sharpen=4.0)
    pixels = random_pixels(model, 4, seed=8)
    got = encode(model, pixels, 8, feature_layer=-2, schedule="per_image", backend=backend)
    alone = [encode(model, pixels[b : b + 1], 8, feature_layer=-2, backend=backend) for b in range(4)]
    assert len({tuple(t) for t in got.tokens_per_layer}) > 1  # the schedules differ between images
    for b, one in enumerate(alone):
        assert torch.equal(got.keep_indices[b], one.keep_indices[0]) and got.tokens_per_layer[b] == one.tokens_per_layer
        torch.testing.assert_close(got.features[b], one.features[0], rtol=1e-5, atol=1e-5)
    batch = encode(model, pixels, 8, feature_layer=-2, backend=backend)
    assert isinstance(batch.tokens_per_layer[0], int)  # the batch rule: one schedule


def test_schedule_prunes_progressively(tiny_clip):
    """Sharpened attention makes the adaptive steps prune before the last one (the tests above bite)."""
    model = tiny_clip()
    out = encode(model, random_pixels(model, 2), 8, feature_layer=-1)
    # 6 layers, F = 5: prune steps after layers 0, 2, 4 (steps left 4, 2, 0).
    assert out.tokens_per_layer[0] == 65 and out.tokens_per_layer[-1] == 9
    assert 65 > out.tokens_per_layer[1] > out.tokens_per_layer[3] > 9
    keep = out.keep_indices
    assert (keep[:, 1:] > keep[:, :-1]).all() and keep.min() >= 0 and keep.max() < 64


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_encode_bf16_tracks_the_oracle(seed):
    """bf16 runs keep bf16 end to end and track the float64 oracle.

    With sharp attention a bf16 forward drifts from a float64 one by itself (the same bf16 weights
    computed in float32 match the oracle exactly: see the fp32 test), so a few kept tokens may
    differ, and features are compared by norm-relative error on the images that kept the oracle's
    exact set: a wrong row, layer or CLS handling gives errors near 1.
    """
    model = random_clip_vision("tiny", seed=seed, sharpen=8.0, dtype=torch.bfloat16)
    pixels = random_pixels(model, 3, seed=seed)
    got = encode(model, pixels, 8, feature_layer=-1)
    features, keep_indices, tokens = naive_encode(model, pixels, 8, -1)

    assert got.features.dtype == torch.bfloat16 and got.features.shape == (3, 8, 32)
    assert len(got.tokens_per_layer) == len(tokens) and got.tokens_per_layer[-1] == 9
    same = got.keep_indices[:, :, None] == keep_indices[:, None, :]  # (B, K, K)
    assert same.any(-1).float().mean() >= 0.85
    agree = (got.keep_indices == keep_indices).all(-1)
    assert agree.any()
    diff = got.features[agree].double() - features[agree]
    rel = diff.norm(dim=(1, 2)) / features[agree].norm(dim=(1, 2))
    assert rel.max() <= 0.2 and rel.median() <= 0.03, rel


def test_encode_with_projection_and_eager_attention(tiny_clip):
    plain = tiny_clip(seed=3)
    projected = tiny_clip(seed=3, with_projection=True, attn_implementation="eager")
    pixels = random_pixels(plain, 2, seed=3)
    a, b = encode(plain, pixels, 8), encode(projected, pixels, 8)
    assert torch.equal(a.keep_indices, b.keep_indices)
    torch.testing.assert_close(a.features, b.features, rtol=1e-5, atol=1e-5)




def _square_token_tensors(shapes, tokens):
    return [s for s in shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in tokens]


def test_encode_never_builds_the_attention_matrix(tiny_clip):
    model = tiny_clip()  # sdpa, the default
    pixels = random_pixels(model, 2)
    with TensorShapes() as sdpa:
        out = encode(model, pixels, 8)
    assert _square_token_tensors(sdpa.shapes, set(out.tokens_per_layer)) == []
    # The detector does see an S×S matrix when the model itself uses eager attention.
    eager = tiny_clip(attn_implementation="eager")
    with TensorShapes() as seen:
        encode(eager, pixels, 8)
    assert _square_token_tensors(seen.shapes, {65})
    assert model.config._attn_implementation == "sdpa"


def test_layers_after_the_feature_layer_do_not_run(tiny_clip):
    model = tiny_clip()
    layers = model.encoder.layers if hasattr(model, "encoder") else model.vision_model.encoder.layers
    ran = []
    for i, layer in enumerate(layers):  # self_attn: pruning steps call the layer's parts, not the layer
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    out = encode(model, random_pixels(model, 1), 4, feature_layer=-3)
    assert ran == [0, 1, 2, 3] and len(out.tokens_per_layer) == 4


def test_worked_example_clip_l_336_schedule():
    """The worked example of docs/semantics.md: 24 layers, 577 tokens, F = 22; layer 21 prunes to T, 22 runs on
    it, 23 never runs.

    Token geometry of CLIP ViT-L/14-336 (image 336, patch 14), narrow width to stay fast on CPU.
    """
    model = random_clip_vision(
        "clip-l-336", hidden_size=64, intermediate_size=128, num_attention_heads=4, sharpen=10.0
    )
    layers = model.encoder.layers if hasattr(model, "encoder") else model.vision_model.encoder.layers
    for part in (layers[23], layers[23].self_attn, layers[23].mlp):
        part.register_forward_hook(lambda *_: pytest.fail("layer 23 ran"))
    pixels = random_pixels(model, 1)
    for target in (64, 128, 192):
        out = encode(model, pixels, target, feature_layer=-2)
        tokens = out.tokens_per_layer
        assert len(tokens) == 23 and tokens[0] == 577
        assert tokens[22] == target + 1  # layer 21 pruned to T, layer 22 runs on T
        assert out.features.shape == (1, target, 64)
        # Only layers 1, 3, …, 21 prune: a count changes only after an odd layer.
        changed = [i for i in range(22) if tokens[i + 1] != tokens[i]]
        assert changed and all(i % 2 == 1 for i in changed)
        assert len(changed) > 1  # progressive, not only the last step


# --- bad input ------------------------------------------------------------------------------------

def test_encode_bad_input(tiny_clip):
    model = tiny_clip()
    pixels = random_pixels(model, 1)
    with pytest.raises(FlowCutInputError, match="target_num=0 is out of range"):
        encode(model, pixels, 0)
    with pytest.raises(FlowCutInputError, match="target_num=64 is out of range"):
        encode(model, pixels, 64)
    with pytest.raises(FlowCutInputError, match="target_num must be an int"):
        encode(model, pixels, 8.0)
    for layer in (0, 1, 6, -6, -7):
        with pytest.raises(FlowCutInputError, match=f"feature_layer={layer} is out of range"):
            encode(model, pixels, 8, feature_layer=layer)
    with pytest.raises(FlowCutInputError, match="backend='nope'"):
        encode(model, pixels, 8, backend="nope")
    with pytest.raises(FlowCutInputError, match="schedule='each' is not one of 'batch', 'per_image'"):
        encode(model, pixels, 8, schedule="each")
    with pytest.raises(FlowCutInputError, match="pixel_values must have shape"):
        encode(model, pixels[0], 8)
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(FlowCutInputError, match=f"pixel_values has dtype {dtype}: raw image values"):
            encode(model, (pixels * 255).to(dtype), 8)
    with pytest.raises(FlowCutInputError, match="pixel_values is on meta"):
        encode(model, pixels.to("meta"), 8)
    with pytest.raises(FlowCutInputError, match="vision_model is a Linear"):
        encode(torch.nn.Linear(2, 2), pixels, 8)

"""FlowCut on ViT, DINOv2 and DINOv2-with-registers towers (CLS variant; registers never scored nor pruned):
encode and the patched model against the float64 oracle (tests/oracle/vit.py)."""

import copy

import pytest
import torch

from conftest import CPU_BACKENDS
from flowcut_kernels import (
    FlowCutInputError, FlowCutVisionOutput, calibrate_schedule, encode, flowcut, remove_flowcut,
)
from flowcut_kernels.models.registry import find_tower
from oracle.vit import final_layernorm, naive_vit_encode
from tiny import vit as tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: name → (builder, registers)
TOWERS = {
    "vit": (tiny.vit, 0),
    "dinov2": (tiny.dinov2, 0),
    "dinov2-registers": (lambda **kw: tiny.dinov2(registers=4, **kw), 4),
}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def _check(name, batch, seed, feature_layer, target, backend="auto"):
    make, regs = TOWERS[name]
    model = make(seed=seed)
    pixels = tiny.pixels(model, batch, seed=seed)
    got = encode(model, pixels, target, feature_layer=feature_layer, backend=backend)
    out, keep_indices, tokens = naive_vit_encode(model, pixels, target, feature_layer, regs)
    assert got.tokens_per_layer == tokens and tokens[0] == 65 + regs and tokens[-1] == target + 1 + regs
    assert got.features.shape == (batch, target, 32) and got.features.dtype == torch.float32
    assert torch.equal(got.keep_indices, keep_indices)
    torch.testing.assert_close(got.features.double(), out[:, 1 + regs:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TOWERS)
@pytest.mark.parametrize("batch,seed", [(1, 0), (3, 1)])
@pytest.mark.parametrize("feature_layer", [-1, -2])
@pytest.mark.parametrize("target", [1, 8, 30])
def test_encode_matches_the_oracle(name, batch, seed, feature_layer, target):
    _check(name, batch, seed, feature_layer, target)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend(backend):
    _check("dinov2-registers", 3, 2, -2, 10, backend)


def test_the_schedule_prunes_progressively():
    for name, (make, regs) in TOWERS.items():
        model = make(seed=1)
        tokens = encode(model, tiny.pixels(model, 2, seed=1), 8).tokens_per_layer
        assert tokens[0] > tokens[2] > tokens[4] > tokens[5] == 9 + regs, (name, tokens)


@pytest.mark.parametrize("name", TOWERS)
def test_float64_model_matches_the_oracle_exactly(name):
    make, regs = TOWERS[name]
    model = make(seed=4).double()
    pixels = tiny.pixels(model, 2, seed=4)
    got = encode(model, pixels, 8, feature_layer=-2)
    out, keep_indices, tokens = naive_vit_encode(model, pixels, 8, -2, regs)
    assert got.features.dtype == torch.float64 and got.tokens_per_layer == tokens
    assert torch.equal(got.keep_indices, keep_indices)
    torch.testing.assert_close(got.features, out[:, 1 + regs:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TOWERS)
def test_per_image_schedule_equals_separate_calls(name):
    """One padded pass with a key mask (on 5.0 the layers take no mask: it reaches the attention through the
    capture) gives each image its own result."""
    make, regs = TOWERS[name]
    model = make(seed=3)
    pixels = tiny.pixels(model, 3, seed=3)
    together = encode(model, pixels, 8, schedule="per_image")
    assert len({tuple(t) for t in together.tokens_per_layer}) > 1  # the images were padded at some layer
    for b in range(3):
        alone = encode(model, pixels[b:b + 1], 8)
        assert together.tokens_per_layer[b] == alone.tokens_per_layer
        assert torch.equal(together.keep_indices[b:b + 1], alone.keep_indices)
        torch.testing.assert_close(together.features[b:b + 1], alone.features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TOWERS)
def test_patched_forward_matches_the_oracle_and_the_stock_pooling(name):
    make, regs = TOWERS[name]
    model = make(seed=5)
    pixels = tiny.pixels(model, 2, seed=5)
    assert flowcut(model, 8, feature_layer=-2) is model
    got = model(pixels)
    out, keep_indices, _ = naive_vit_encode(model, pixels, 8, -2, regs)
    want = final_layernorm(model, out)
    assert isinstance(got, FlowCutVisionOutput) and got.last_hidden_state.shape == (2, 9 + regs, 32)
    assert torch.equal(got.keep_indices, keep_indices)
    torch.testing.assert_close(got.last_hidden_state.double(), want, rtol=1e-4, atol=1e-4)  # CLS, registers, patches
    if name == "vit":
        torch.testing.assert_close(got.pooler_output, model.pooler(got.last_hidden_state))
    else:
        assert torch.equal(got.pooler_output, got.last_hidden_state[:, 0])


def test_vit_without_pooler_and_interpolated_resolution():
    model = flowcut(tiny.vit(pooler=False), 8)
    out = model(tiny.pixels(model, 1, size=48), interpolate_pos_encoding=True)  # 12×12 = 144 patches
    assert out.pooler_output is None and out.tokens_per_layer[0] == 145 and out.keep_indices.max() < 144
    dino = flowcut(tiny.dinov2(registers=4), 8)  # DINOv2 interpolates by itself
    assert dino(tiny.pixels(dino, 1, size=48)).tokens_per_layer[0] == 149


@pytest.mark.parametrize("name", TOWERS)
def test_per_instance_reversible_and_hidden_states(name):
    make, regs = TOWERS[name]
    patched, other = make(seed=6), make(seed=6)
    pixels = tiny.pixels(patched, 2, seed=6)
    before = patched(pixels)
    flowcut(patched, 8)
    out = patched(pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 7 and [h.shape[1] for h in out.hidden_states[1:]] == out.tokens_per_layer
    assert patched(pixels, return_dict=False)[0].shape == (2, 9 + regs, 32)
    assert torch.equal(other(pixels).last_hidden_state, before.last_hidden_state)
    clone = copy.deepcopy(patched)
    remove_flowcut(patched)
    after = patched(pixels)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.pooler_output, before.pooler_output)
    assert not hasattr(patched, "flowcut_config") and "forward" not in patched.__dict__
    assert clone(pixels).keep_indices.shape == (2, 8)


def test_static_schedule_counts_patches_only():
    model = tiny.dinov2(registers=4, seed=7)
    pixels = tiny.pixels(model, 4, seed=7)
    schedule = calibrate_schedule(model, pixels, 8)
    assert schedule.counts[0] == 64 and schedule.counts[-1] == 8
    static = encode(model, pixels[:2], 8, schedule=schedule)
    assert static.tokens_per_layer[0] == 69 and static.tokens_per_layer[-1] == 13
    flowcut(model, 8, schedule=schedule)
    assert torch.equal(model(pixels[:2]).keep_indices, static.keep_indices)


def test_bf16_is_finite():
    model = tiny.dinov2(registers=4, seed=8, dtype=torch.bfloat16)
    got = encode(model, tiny.pixels(model, 2, seed=8), 8)
    assert got.features.dtype == torch.bfloat16 and torch.isfinite(got.features).all()


def test_find_tower():
    tower = find_tower(tiny.dinov2(registers=4))
    assert tower.has_cls and tower.num_registers == 4 and tower.prefix == 5 and tower.num_patches == 64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_num=64), "target_num=64 is out of range"),
        (dict(target_num=8, feature_layer=-6), "feature_layer=-6 is out of range"),
        (dict(target_num=8, llm_stage=True), "llm_stage=True needs a language model"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kwargs, match):
    model = tiny.dinov2(registers=4)
    attrs = dict(model.__dict__)
    with pytest.raises(FlowCutInputError, match=match):
        flowcut(model, **kwargs)
    assert model.__dict__ == attrs and not hasattr(model, "flowcut_config")
    flowcut(model, 8)
    with pytest.raises(FlowCutInputError, match="output_attentions"):
        model(tiny.pixels(model, 1), output_attentions=True)

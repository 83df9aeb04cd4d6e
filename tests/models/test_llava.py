"""flowcut() on HF LLaVA-1.5: placeholders, projector input, generate(), per instance and reversible.

Tiny random models from configs (random_llava: CLIP tower 32 px / patch 4 → 64 patches, 6 layers;
Llama text model, vocabulary 64, 2 layers). The independent references are tests/oracle/llava.py (features
from docs/semantics.md in float64) fed to a stock, unpatched twin of the model through inputs_embeds.
"""

import copy
import importlib.util

import pytest
import torch
from transformers import LlavaModel

from conftest import CPU_BACKENDS, TensorShapes
from flowcut_kernels import FlowCutInputError, encode, flowcut, remove_flowcut
from flowcut_kernels.bench.random_models import random_pixels
from tiny.llava import random_llava, tiny_llava_processor
from tiny.text import TINY_WORDS, tiny_tokenizer
from flowcut_kernels import FlowCutImageFeatures
from flowcut_kernels.models import seams
from flowcut_kernels.models.registry import find_tower
from oracle.llava import naive_llava_embeds, naive_llava_features
from vlm_cases import assert_restored, check_shared_processor_refused, random_images, refused, snapshot_attributes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

needs_pil = pytest.mark.skipif(
    importlib.util.find_spec("PIL") is None, reason="transformers' image processors need Pillow"
)

IMAGE = TINY_WORDS.__len__()  # the <image> token id
PROMPTS = ["USER: <image> w1 w2 w3 w4 ASSISTANT:", "USER: <image> w5 ASSISTANT:", "USER: w6 <image> w7 w8 ASSISTANT:"]
# SigLIP has no pre-layernorm, so a softer sharpening keeps float32 close to the float64 oracle.
SHARPEN = {"clip": 8.0, "siglip": 4.0}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def tiny_llava(vision="clip", seed=0, **kwargs):
    return random_llava(vision, seed=seed, sharpen=SHARPEN[vision], **kwargs)


def inputs(model, prompts, target, seed=0):
    """Tokenised prompts with ``target`` placeholders per image (left-padded) and matching pixels."""
    tokenizer = tiny_tokenizer()
    batch = tokenizer([p.replace("<image>", "<image>" * target) for p in prompts], padding=True, return_tensors="pt")
    pixels = random_pixels(model.model.vision_tower, len(prompts), seed=seed)
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)


def images(n, seed=0):
    """``n`` random 32 × 32 images."""
    return random_images([(32, 32)] * n, seed)


def count(batch):
    """Image placeholders per prompt of a processor's or tokenizer's output (lists or tensors)."""
    return [list(ids).count(IMAGE) for ids in torch.as_tensor(batch["input_ids"]).tolist()]


class ProjectorInput:
    """Records what the model's multi_modal_projector receives."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: self.seen.append(args[0])
        )


# --- placeholders ---------------------------------------------------------------------------------


@needs_pil
@pytest.mark.parametrize("vision,strategy", [("clip", "default"), ("siglip", "full"), ("siglip", "default")])
@pytest.mark.parametrize("target", [1, 7, 10, 16, 63])
def test_processor_emits_target_placeholders(vision, strategy, target):
    model = tiny_llava(vision, vision_feature_select_strategy=strategy)
    processor, other = tiny_llava_processor(model), tiny_llava_processor(model)
    before = dict(vars(processor))
    stock = 64 + (vision == "clip") - (strategy == "default")  # patches, + CLS, − the "default" drop
    assert count(processor(text=PROMPTS[:2], images=images(2), padding=True)) == [stock, stock]

    flowcut(model, target, processor=processor)
    assert count(processor(text=PROMPTS, images=images(3), padding=True)) == [target] * 3
    assert count(processor(text="USER: <image> <image> w1", images=images(2))) == [2 * target]
    assert count(other(text=PROMPTS[:1], images=images(1))) == [stock]  # another instance: untouched
    assert type(processor).__dict__.get("patch_size") is None and "patch_size" not in vars(type(processor))

    remove_flowcut(model)
    assert vars(processor) == before
    assert count(processor(text=PROMPTS[:1], images=images(1))) == [stock]


@needs_pil
def test_processor_end_to_end_generate():
    """The issue's one call: a stock processor and generate() on its output, batched and single."""
    model = tiny_llava()
    processor = tiny_llava_processor(model)
    flowcut(model, 10, processor=processor)
    batch = processor(text=PROMPTS, images=images(3), padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4)
    assert out.shape == (3, batch["input_ids"].shape[1] + 4)
    for i, prompt in enumerate(PROMPTS):
        single = processor(text=prompt, images=images(3)[i], return_tensors="pt")
        row = model.generate(**single, max_new_tokens=4)
        assert torch.equal(row[0, -4:], out[i, -4:])


def test_mismatched_placeholders_name_the_processor():
    model = flowcut(tiny_llava(), 10)
    stock = inputs(model, PROMPTS[:2], 64)  # what an unpatched processor emits
    with pytest.raises(FlowCutInputError, match=r"128 image placeholder.*processor=processor"):
        model(**stock)
    with pytest.raises(FlowCutInputError, match="processor=processor"):
        model.generate(**stock, max_new_tokens=2)
    embeds = model.get_input_embeddings()(stock["input_ids"])  # the inputs_embeds path counts too
    with pytest.raises(FlowCutInputError, match="128 image placeholder"):
        model(inputs_embeds=embeds, pixel_values=stock["pixel_values"], attention_mask=stock["attention_mask"])


# --- features -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision", ["clip", "siglip"])
@pytest.mark.parametrize("batch,seed", [(1, 0), (3, 1)])
@pytest.mark.parametrize("target", [1, 10, 40])
def test_projector_input_equals_encode_and_oracle(vision, batch, seed, target):
    model, twin = tiny_llava(vision, seed), tiny_llava(vision, seed)
    flowcut(model, target)
    given = inputs(model, PROMPTS[:batch], target, seed)
    seen = ProjectorInput(model)
    logits = model(**given).logits

    (features,) = seen.seen
    pixels = given["pixel_values"]
    want = [encode(model.model.vision_tower, pixels[b : b + 1], target, feature_layer=-2) for b in range(batch)]
    assert features.shape == (batch, target, 32)
    # One batched tower pass: equal to each image alone up to the batched kernels' rounding.
    torch.testing.assert_close(features, torch.cat([w.features for w in want]), rtol=1e-5, atol=1e-5)

    oracle, projected, keep, tokens = naive_llava_features(twin, pixels, target)
    assert torch.equal(torch.cat([w.keep_indices for w in want]), keep)
    assert [w.tokens_per_layer for w in want] == tokens and all(len(t) == 5 for t in tokens)
    torch.testing.assert_close(features.double(), oracle, rtol=1e-4, atol=1e-3)
    # End to end: the stock twin on the oracle's features gives the same logits.
    embeds = naive_llava_embeds(twin, given["input_ids"], projected)
    reference = twin(inputs_embeds=embeds, attention_mask=given["attention_mask"]).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_four_images_one_tower_pass_each_on_its_own_schedule(vision):
    """4 images: the tower's layer 0 runs once per call, and each image's kept indices and projected features
    equal those of that image alone (fp32: indices exact, features within 1e-5 relative)."""
    model = flowcut(tiny_llava(vision, seed=7), 10)
    pixels = random_pixels(model.model.vision_tower, 4, seed=7)
    calls = []
    first = find_tower(model.model.vision_tower).layers[0]
    handle = first.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    together = model.model.get_image_features(pixel_values=pixels)
    assert calls == [4]
    alone = [model.model.get_image_features(pixel_values=pixels[b : b + 1]) for b in range(4)]
    handle.remove()
    assert len({tuple(t) for t in together.tokens_per_layer}) > 1  # the schedules do differ
    for b, one in enumerate(alone):
        assert torch.equal(together.keep_indices[b], one.keep_indices[0])
        assert together.tokens_per_layer[b] == one.tokens_per_layer[0]
        got, want = together.pooler_output[b], one.pooler_output[0]
        assert (got - want).norm() <= 1e-5 * want.norm()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend(backend):
    model = flowcut(tiny_llava(), 10, backend=backend)
    given = inputs(model, PROMPTS[:2], 10)
    seen = ProjectorInput(model)
    model(**given)
    tower, pixels = model.model.vision_tower, given["pixel_values"]
    want = [encode(tower, pixels[b : b + 1], 10, feature_layer=-2, backend=backend).features for b in range(2)]
    torch.testing.assert_close(seen.seen[0], torch.cat(want), rtol=1e-5, atol=1e-5)


def test_images_are_pruned_independently_of_their_batch():
    """A batch's schedule is each image's own: the batch rule's maximum would let one image change another's set."""
    model = flowcut(tiny_llava(), 10)
    pixels = random_pixels(model.model.vision_tower, 3, seed=4)
    batched = model.model.get_image_features(pixel_values=pixels, output_hidden_states=True)
    singles = [model.model.get_image_features(pixel_values=pixels[b : b + 1]) for b in range(3)]
    assert torch.equal(batched.keep_indices, torch.cat([s.keep_indices for s in singles]))
    assert batched.tokens_per_layer == [s.tokens_per_layer[0] for s in singles]
    # These images do prune on different schedules, so a batch-wide schedule would differ.
    assert len({tuple(t) for t in batched.tokens_per_layer}) > 1
    batch_wide = encode(model.model.vision_tower, pixels, 10, feature_layer=-2)
    assert not torch.equal(batch_wide.keep_indices, batched.keep_indices)
    states = batched.hidden_states
    assert len(states) == 3 and [[h.shape[1] for h in s[1:]] for s in states] == batched.tokens_per_layer


def test_get_image_features_return_types():
    model = flowcut(tiny_llava(), 10)
    pixels = random_pixels(model.model.vision_tower, 2)
    out = model.get_image_features(pixel_values=pixels)  # the outer model delegates to the patched LlavaModel
    assert isinstance(out, FlowCutImageFeatures)
    assert isinstance(out.pooler_output, list) and [f.shape for f in out.pooler_output] == [(10, 32)] * 2
    assert out.last_hidden_state.shape == (2, 11, 32) and out.keep_indices.shape == (2, 10)
    assert out.hidden_states is None and len(out.tokens_per_layer) == 2
    states = model.model.get_image_features(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert [[h.shape[1] for h in image] for image in states] == [[65] + t for t in out.tokens_per_layer]
    as_tuple = model.model.get_image_features(pixel_values=pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    positive = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=5)  # = -2 of 6 layers
    assert torch.equal(positive.last_hidden_state, out.last_hidden_state)


def test_tower_runs_only_to_the_feature_layer_without_the_attention_matrix():
    model = flowcut(tiny_llava(), 10)
    layers = model.model.vision_tower.config.num_hidden_layers
    tower_layers = model.model.vision_tower.vision_model.encoder.layers if hasattr(
        model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers
    tower_layers[layers - 1].register_forward_hook(lambda *_: pytest.fail("a layer after the feature layer ran"))
    given = inputs(model, PROMPTS[:2], 10)

    with TensorShapes() as seen:
        model.model.get_image_features(pixel_values=given["pixel_values"])
    assert not [s for s in seen.shapes if len(s) == 4 and s[-1] == s[-2] and s[-1] > 10]
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


def test_eager_attention_gives_the_same_features():
    sdpa, eager = flowcut(tiny_llava(), 10), flowcut(tiny_llava(attn_implementation="eager"), 10)
    assert eager.model.vision_tower.config._attn_implementation == "eager"
    pixels = random_pixels(sdpa.model.vision_tower, 2)
    a, b = sdpa.model.get_image_features(pixel_values=pixels), eager.model.get_image_features(pixel_values=pixels)
    assert torch.equal(a.keep_indices, b.keep_indices)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_llava_model_alone():
    full = tiny_llava()
    core = flowcut(full.model, 10)
    assert isinstance(core, LlavaModel) and core.flowcut_config.target_num == 10
    given = inputs(full, PROMPTS[:2], 10)
    out = core(**given)
    assert seams.image_features(out).shape == (20, 32)
    remove_flowcut(core)
    assert "get_image_features" not in vars(core)


# --- generate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_generate_batch_rows_equal_single_prompts_and_cache(vision):
    model, twin = flowcut(tiny_llava(vision), 12), tiny_llava(vision)
    batch = inputs(model, PROMPTS, 12)
    new = 5
    out = model.generate(**batch, max_new_tokens=new)
    assert out.shape == (3, batch["input_ids"].shape[1] + new)
    assert (batch["attention_mask"] == 0).any()  # the batch is left-padded
    for i, prompt in enumerate(PROMPTS):
        single = inputs(model, [prompt], 12)
        single["pixel_values"] = batch["pixel_values"][i : i + 1]
        assert torch.equal(model.generate(**single, max_new_tokens=new)[0, -new:], out[i, -new:])
    no_cache = model.generate(**batch, max_new_tokens=new, use_cache=False)
    assert torch.equal(no_cache, out)
    # The same tokens as a stock model fed the oracle's features.
    projected = naive_llava_features(twin, batch["pixel_values"], 12)[1]
    embeds = naive_llava_embeds(twin, batch["input_ids"], projected)
    reference = twin.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=new)
    assert torch.equal(reference[:, -new:], out[:, -new:])


def test_generate_output_hidden_states():
    model = flowcut(tiny_llava(), 12)
    batch = inputs(model, PROMPTS[:2], 12)
    out = model.generate(**batch, max_new_tokens=3, output_hidden_states=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 3
    prefill = out.hidden_states[0]
    assert len(prefill) == 3  # embeddings + 2 decoder layers
    assert prefill[0].shape == (2, batch["input_ids"].shape[1], 32)
    assert len(out.hidden_states) == 3 and out.hidden_states[1][0].shape[1] == 1


def test_generate_beam_search_and_several_sequences():
    model = flowcut(tiny_llava(), 12)
    batch = inputs(model, PROMPTS[:2], 12)
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"].repeat_interleave(2, 0))


def test_generate_encodes_the_images_once_with_cache():
    model = flowcut(tiny_llava(), 12)
    model.model.vision_tower.register_forward_hook(lambda *_: pytest.fail("the stock tower forward ran"))
    seen = ProjectorInput(model)
    model.generate(**inputs(model, PROMPTS[:2], 12), max_new_tokens=3)
    assert [f.shape for f in seen.seen] == [(2, 12, 32)]


# --- per instance, reversible --------------------------------------------------------------------


def test_patched_and_unpatched_side_by_side_and_remove():
    patched, plain = tiny_llava(seed=3), tiny_llava(seed=3)
    stock = inputs(plain, PROMPTS[:2], 64)
    before = plain(**stock).logits
    snapshot = snapshot_attributes(patched, patched.model)
    weights = {k: v.clone() for k, v in patched.state_dict().items()}
    class_method = LlavaModel.get_image_features

    flowcut(patched, 10)
    assert patched(**inputs(patched, PROMPTS[:2], 10)).logits.shape[1] < before.shape[1]
    assert torch.equal(plain(**stock).logits, before)  # same class, not patched
    assert LlavaModel.get_image_features is class_method and "get_image_features" not in vars(plain.model)
    assert patched.flowcut_config is patched.model.flowcut_config

    assert remove_flowcut(patched) is patched
    assert_restored(snapshot)
    assert all(torch.equal(v, weights[k]) for k, v in patched.state_dict().items())
    assert torch.equal(patched(**stock).logits, before)
    assert remove_flowcut(patched) is patched  # twice is a no-op


@needs_pil
def test_reapply_deepcopy_and_processor_swap():
    model = tiny_llava()
    first, second = tiny_llava_processor(model), tiny_llava_processor(model)
    snapshot = snapshot_attributes(model, model.model, first, second)
    flowcut(model, 8, processor=first)
    flowcut(model, 16)  # re-apply: the model keeps its processor, updated to the new target
    assert count(first(text=PROMPTS[:1], images=images(1))) == [16]
    out = model.generate(**first(text=PROMPTS[:1], images=images(1), return_tensors="pt"), max_new_tokens=2)
    clone = copy.deepcopy(model)
    flowcut(model, 20, processor=second)  # another processor: the first is restored
    assert count(first(text=PROMPTS[:1], images=images(1))) == [64]
    assert count(second(text=PROMPTS[:1], images=images(1))) == [20]
    remove_flowcut(model)
    assert_restored(snapshot)
    assert out.shape == (1, 1 + 16 + 5 + 2)  # USER: <image>×16 w1 … w4 ASSISTANT: and 2 new tokens
    # The copy keeps its patch, with its own copy of the processor.
    assert clone.flowcut_config.target_num == 16 and vars(clone.model)["_flowcut_processor"] is not first
    assert clone.generate(**inputs(clone, PROMPTS[:1], 16), max_new_tokens=2).shape == (1, 1 + 16 + 5 + 2)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_arguments_leave_model_unchanged():
    model = tiny_llava()
    refused(model, "target_num=64 is out of range", target_num=64)
    refused(model, "target_num=0 is out of range", target_num=0)
    refused(model, "feature_layer=-1 differs from the model's config.vision_feature_layer", target_num=8,
            feature_layer=-1)
    refused(model, "backend='nope'", target_num=8, backend="nope")
    flowcut(model, 8, feature_layer=-2)  # the configured layer itself is fine
    refused(model, "target_num=64", target_num=64)
    assert model.flowcut_config.target_num == 8


def test_unsupported_configurations_are_refused():
    several = tiny_llava(vision_feature_layer=[-2, -1])
    refused(several, r"vision_feature_layer=\[-2, -1\] selects several feature layers", target_num=8)
    full = tiny_llava(vision_feature_select_strategy="full")
    refused(full, "vision_feature_select_strategy='full' is not supported", target_num=8)
    siglip = flowcut(tiny_llava("siglip", vision_feature_select_strategy="default"), 8)  # no CLS: either works
    assert seams.image_features(siglip.model(**inputs(siglip, PROMPTS[:1], 8))).shape == (8, 32)
    pixels = random_pixels(full.model.vision_tower, 1)
    model = flowcut(tiny_llava(), 8)
    with pytest.raises(FlowCutInputError, match="selects several feature layers"):
        model.model.get_image_features(pixel_values=pixels, vision_feature_layer=[-2, -1])
    with pytest.raises(FlowCutInputError, match="'full' is not supported"):
        model.model.get_image_features(pixel_values=pixels, vision_feature_select_strategy="full")
    with pytest.raises(FlowCutInputError, match="image_sizes"):
        model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[32, 32]]))
    with pytest.raises(FlowCutInputError, match="output_attentions"):
        model.model.get_image_features(pixel_values=pixels, output_attentions=True)


def test_unsupported_models_are_refused():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, ViTConfig

    vit = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=4)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vit, text_config=tiny_llava().config.text_config))
    refused(model, "vision tower is a ViTModel.*CLIPVisionModel.*SiglipVisionModel", target_num=8)
    with pytest.raises(FlowCutInputError, match="model is a Linear.*LlavaForConditionalGeneration"):
        flowcut(torch.nn.Linear(2, 2), 8)


def test_mismatched_processors_are_refused():
    model = tiny_llava()
    tokenizer = tiny_tokenizer()
    refused(model, r"processor is a \w+; pass the model.s LlavaProcessor", tokenizer, target_num=8,
            processor=tokenizer)
    if importlib.util.find_spec("PIL") is None:
        return
    other_token = tiny_llava_processor(model)
    other_token.image_token_id = 5
    refused(model, "processor does not match the model.*image_token_id is 63", other_token, target_num=8,
            processor=other_token)
    check_shared_processor_refused(model, tiny_llava_processor(model), tiny_llava(), 8)

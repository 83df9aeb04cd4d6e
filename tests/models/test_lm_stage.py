"""flowcut(..., llm_stage=True) on HF LLaVA-1.5: the language-model stage (docs/semantics.md).

Tiny random LLaVA (random_llava: CLIP tower 32 px / patch 4 → 64 patches; Llama text model with 4 layers,
4 query and 2 key/value heads), the tower's q/k and the decoder's q/k/v sharpened so that both stages' scores are far
from flat. The independent reference is tests/oracle/lm_stage.py (float64, eager, one prompt at a time) fed the
tower-stage features of tests/oracle/llava.py (2·K per image).
"""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS
from oracle.llava import naive_llava_features
from oracle.lm_stage import naive_lm_stage

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut
from flowcut_kernels.bench.random_models import random_pixels
from tiny.llava import random_llava, tiny_llava_processor
from tiny.text import tiny_tokenizer
from vlm_cases import assert_restored, refused, snapshot_attributes
from flowcut_kernels.models import seams
from flowcut_kernels.models.registry import find_tower

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K = 10  # target_num: the tower keeps 20 of 64 patches per image, decoder layer 1 keeps 10 of those
LAYERS = 4
SINGLE = ["USER: <image> w1 w2 w3 w4 ASSISTANT:"]
BATCH = SINGLE + ["USER: <image> w5 ASSISTANT:", "USER: w6 <image> w7 w8 ASSISTANT:"]
TWO_IMAGES = ["USER: <image> w1 <image> w2 w3 ASSISTANT:"]
# The first row is the longer one inside the decoder (2 images), the second in the prompt (22 words).
MIXED = TWO_IMAGES + ["USER: " + " ".join(f"w{i}" for i in range(20)) + " <image> ASSISTANT:"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def stage_llava(seed=0, sharpen=8.0, **kwargs):
    """A tiny LLaVA whose decoder's q/k/v are multiplied by ``sharpen`` (both stage terms far from uniform)."""
    model = random_llava("clip", seed=seed, sharpen=8.0, text={"num_hidden_layers": LAYERS}, **kwargs)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(sharpen)
    return model


def inputs(model, prompts, seed=0, placeholders=K, padding_side="left"):
    """Tokenised prompts with ``placeholders`` per image (padded) and one image per <image>."""
    batch = tiny_tokenizer()(
        [p.replace("<image>", "<image>" * placeholders) for p in prompts], padding=True, return_tensors="pt",
        padding_side=padding_side,
    )
    images = sum(p.count("<image>") for p in prompts)
    pixels = random_pixels(model.model.vision_tower, images, seed=seed)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": pixels}


def singles(model, prompts, batch):
    """Each prompt alone, with its images from ``batch``."""
    pixels = batch["pixel_values"].split([p.count("<image>") for p in prompts])
    return [{**inputs(model, [prompt]), "pixel_values": pixels[i]} for i, prompt in enumerate(prompts)]


def assert_close(got, want, rtol=1e-4):
    """Each row within ``rtol`` of the reference, relative to its norm."""
    error = (got.double() - want).norm(dim=-1)
    assert bool((error <= rtol * want.norm(dim=-1)).all()), (error / want.norm(dim=-1)).tolist()


# --- the recipe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [SINGLE, BATCH, TWO_IMAGES, MIXED], ids=["single", "batch", "two-images", "mixed"])
def test_prefill_and_first_decode_step_equal_oracle(prompts):
    """Prefill logits (forward and generate) and the next step's, which reads the cut cache, against float64."""
    model, twin = flowcut(stage_llava(), K, llm_stage=True), stage_llava()
    given = inputs(model, prompts)
    logits = model(**given).logits[:, -1]
    out = model.generate(**given, max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    first = out.sequences[:, given["input_ids"].shape[1]]

    features = naive_llava_features(twin, given["pixel_values"], 2 * K)[1]
    want, step, kept = naive_lm_stage(twin, given["input_ids"], given["attention_mask"], features, K, first)
    assert len(kept) == len(given["pixel_values"]) and all(len(k) == K for k in kept)
    assert_close(logits, want)
    assert_close(out.logits[0], want)
    assert_close(out.logits[1], step)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend(backend):
    model = flowcut(stage_llava(), K, llm_stage=True, backend=backend)
    reference = flowcut(stage_llava(), K, llm_stage=True, backend="torch")
    given = inputs(model, MIXED)
    torch.testing.assert_close(model(**given).logits, reference(**given).logits, rtol=1e-5, atol=1e-5)


def test_eager_attention_gives_the_same_tokens():
    sdpa, eager = (flowcut(stage_llava(attn_implementation=a), K, llm_stage=True) for a in ("sdpa", "eager"))
    given = inputs(sdpa, MIXED)
    torch.testing.assert_close(sdpa(**given).logits[:, -1], eager(**given).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(sdpa.generate(**given, max_new_tokens=6), eager.generate(**given, max_new_tokens=6))
    assert eager.model.language_model.config._attn_implementation == "eager"


def test_inputs_embeds_and_llava_model_alone():
    model = flowcut(stage_llava(), K, llm_stage=True)
    given = inputs(model, BATCH)
    logits = model(**given).logits
    embeds = model.get_input_embeddings()(given.pop("input_ids"))
    torch.testing.assert_close(model(inputs_embeds=embeds, **given).logits, logits, rtol=1e-5, atol=1e-5)
    core = flowcut(stage_llava().model, K, llm_stage=True)
    out = core(**inputs(model, BATCH))
    assert out.last_hidden_state.shape == (3, logits.shape[1], 32)
    assert seams.image_features(out).shape == (3 * 2 * K, 32)  # the tower stage's features, 2K per image


def test_layers_after_the_prune_see_target_num_per_image():
    """Layers 0 and 1 run on 2K tokens per image, layers 2 and 3 on the prompt's K; the cache is the prompt's length."""
    model = flowcut(stage_llava(), K, llm_stage=True)
    given = inputs(model, MIXED)
    lengths = {i: [] for i in range(LAYERS)}
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: lengths[i].append(args[0].shape[1]))
    out = model(**given)
    short = given["input_ids"].shape[1]
    real = given["attention_mask"].sum(1)
    images = torch.tensor([p.count("<image>") for p in MIXED])
    long = int((real + images * K).max())  # each image's K placeholders become its 2K features
    assert long > short
    assert lengths == {0: [long], 1: [long], 2: [short], 3: [short]}
    assert [seams.output_cache(out).get_seq_length(i) for i in range(LAYERS)] == [short] * LAYERS


def test_output_hidden_states():
    model = flowcut(stage_llava(), K, llm_stage=True)
    given = inputs(model, SINGLE)
    short = given["input_ids"].shape[1]
    states = model(**given, output_hidden_states=True).hidden_states
    assert [s.shape[1] for s in states] == [short + K] * 3 + [short] * 2  # embeddings, layers 0 … 3
    out = model.generate(**given, max_new_tokens=3, output_hidden_states=True, return_dict_in_generate=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[1][0].shape[1] == 1


# --- generate -------------------------------------------------------------------------------------


def test_generate_batched_rows_equal_single_prompts():
    model = flowcut(stage_llava(), K, llm_stage=True)
    prompts = BATCH + TWO_IMAGES
    batch = inputs(model, prompts)
    assert (batch["attention_mask"] == 0).any()  # left-padded
    new = 8
    out = model.generate(**batch, max_new_tokens=new)
    assert out.shape == (4, batch["input_ids"].shape[1] + new)
    for i, single in enumerate(singles(model, prompts, batch)):
        assert torch.equal(model.generate(**single, max_new_tokens=new)[0, -new:], out[i, -new:])


def test_generate_beam_search():
    """Beams of a prompt with two images each get both, in order: the pixels expand prompt by prompt."""
    model = flowcut(stage_llava(), K, llm_stage=True)
    batch = inputs(model, MIXED)
    seen = []
    embeddings = find_tower(model.model.vision_tower).core.embeddings
    embeddings.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    length, new = batch["input_ids"].shape[1], 4
    out = model.generate(**batch, max_new_tokens=new, num_beams=2, num_return_sequences=2)
    assert torch.equal(seen[0], batch["pixel_values"][[0, 1, 0, 1, 2, 2]])
    assert out.shape == (4, length + new)
    assert torch.equal(out[:, :length], batch["input_ids"].repeat_interleave(2, 0))
    for i, single in enumerate(singles(model, MIXED, batch)):
        alone = model.generate(**single, max_new_tokens=new, num_beams=2, num_return_sequences=2)
        assert torch.equal(alone[:, -new:], out[2 * i : 2 * i + 2, -new:])


def test_generate_without_cache_starts_with_the_same_token():
    """use_cache=False re-runs the stage on prompt + generated tokens at every step (the relay is the newest
    token), so only the first token is bound to equal the cached run's."""
    model = flowcut(stage_llava(), K, llm_stage=True)
    batch = inputs(model, BATCH)
    length = batch["input_ids"].shape[1]
    cached = model.generate(**batch, max_new_tokens=4)
    uncached = model.generate(**batch, max_new_tokens=4, use_cache=False)
    assert torch.equal(uncached[:, length], cached[:, length])


needs_pil = pytest.mark.skipif(
    importlib.util.find_spec("PIL") is None, reason="transformers' image processors need Pillow"
)


@needs_pil
def test_processor_end_to_end():
    model = stage_llava()
    processor = tiny_llava_processor(model)
    flowcut(model, K, processor=processor, llm_stage=True)
    images = [np.random.RandomState(i).randint(0, 256, (32, 32, 3)).astype(np.uint8) for i in range(2)]
    batch = processor(text=BATCH[:2], images=images, padding=True, return_tensors="pt")
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [K, K]
    assert model.generate(**batch, max_new_tokens=3).shape == (2, batch["input_ids"].shape[1] + 3)


# --- per instance, reversible --------------------------------------------------------------------


def test_default_is_tower_only_and_reapply_switches_the_stage():
    model = stage_llava()
    snapshot = snapshot_attributes(model, model.model)
    flowcut(model, K)
    assert "forward" not in vars(model.model) and model.flowcut_config.tower_target == K
    flowcut(model, K, llm_stage=True)
    assert "forward" in vars(model.model) and model.flowcut_config.tower_target == 2 * K
    flowcut(model, K, llm_stage=False)
    assert "forward" not in vars(model.model) and "_supports_mm_encoder_outputs" not in vars(model)
    remove_flowcut(model)
    assert_restored(snapshot)


def test_remove_gives_back_the_stock_model():
    patched, plain, twin = stage_llava(seed=3), stage_llava(seed=3), stage_llava(seed=3)
    stock = inputs(plain, BATCH[:2], placeholders=64)  # what a stock processor emits
    before = plain.generate(**stock, max_new_tokens=6)
    snapshot = snapshot_attributes(patched, patched.model, patched.model.language_model)

    flowcut(patched, K, llm_stage=True)
    patched.generate(**inputs(patched, BATCH), max_new_tokens=3)
    assert torch.equal(plain.generate(**stock, max_new_tokens=6), before)  # same class, not patched
    assert "forward" not in vars(plain.model) and "_supports_mm_encoder_outputs" not in vars(plain)

    remove_flowcut(patched)
    assert_restored(snapshot)
    assert patched.model.language_model.config._attn_implementation == "sdpa"
    assert torch.equal(patched.generate(**stock, max_new_tokens=6), before)
    assert torch.equal(twin.generate(**stock, max_new_tokens=6), before)


# --- bad input ------------------------------------------------------------------------------------


def _refused(model, match, **kwargs):
    """:func:`vlm_cases.refused` with the stage asked for."""
    refused(model, match, llm_stage=True, **kwargs)


def _with_text_model(text_config):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = random_llava().config.vision_config
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text_config)).eval()


def test_unsupported_decoders_are_refused():
    from transformers import MistralConfig, XGLMConfig

    xglm = _with_text_model(XGLMConfig(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, vocab_size=65))
    _refused(xglm, "llm_stage=True needs a Llama-family language model.*XGLMModel.*leave llm_stage unset", target_num=8)
    sliding = _with_text_model(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=65,
                                             sliding_window=16))
    _refused(sliding, "Llama-family language model.*MistralModel", target_num=8)
    one_layer = random_llava(text={"num_hidden_layers": 1})
    _refused(one_layer, "at least 2 layers.*LlamaModel", target_num=8)
    assert flowcut(xglm, 8).flowcut_config.llm_stage is False  # the tower stage alone still works


def test_bad_arguments_are_refused():
    model = stage_llava()
    _refused(model, r"target_num=32 is too large for llm_stage=True.*2·target_num = 64 of its 64.*target_num <= 31",
             target_num=32)
    _refused(model, "backend='nope'", target_num=8, backend="nope")
    snapshot = snapshot_attributes(model, model.model)
    with pytest.raises(FlowCutInputError, match="llm_stage must be True, False or None"):
        flowcut(model, 8, llm_stage="yes")
    assert_restored(snapshot)
    assert flowcut(model, 31, llm_stage=True).flowcut_config.tower_target == 62


def test_bad_prompts_are_refused():
    model = flowcut(stage_llava(), K, llm_stage=True)
    given = inputs(model, BATCH[:2])
    stock = inputs(model, BATCH[:2], placeholders=64)
    with pytest.raises(FlowCutInputError, match=r"128 image placeholder.*processor=processor"):
        model(**stock)
    with pytest.raises(FlowCutInputError, match="processor=processor"):
        model.generate(**stock, max_new_tokens=2)
    split = tiny_tokenizer()("USER: " + "<image>" * 4 + " w1 " + "<image>" * 6 + " ASSISTANT:",
                                       return_tensors="pt")
    with pytest.raises(FlowCutInputError, match="must be consecutive"):
        model(input_ids=split.input_ids, pixel_values=given["pixel_values"][:1])
    with pytest.raises(FlowCutInputError, match="padding_side = 'left'"):
        model(**inputs(model, BATCH[:2], padding_side="right"))
    with pytest.raises(FlowCutInputError, match="output_attentions"):
        model(**given, output_attentions=True)
    assert model(**given).logits.shape[:2] == given["input_ids"].shape  # still works

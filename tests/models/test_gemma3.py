"""flowcut() on HF Gemma 3: the recipe against a float64 oracle (tests/oracle/gemma3.py), whole pooling windows,
generate, per instance and reversible, bad inputs.

Tiny random models (tests/tiny/gemma3.py: a SigLIP tower of 8 × 8 patches, 6 layers, pooled 2 × 2 into 16 tokens;
a 2-layer Gemma 3 decoder), the tower's q/k sharpened.
"""

import copy

import pytest
import torch
from oracle.gemma3 import naive_logits
from tiny.gemma3 import BOI, EOI, IMAGE, random_gemma3, tiny_gemma3_processor
from vlm_cases import (
    random_images,
    assert_bfloat16_finite, check_remove_gives_back,
    check_shared_processor_refused, check_stock_placeholders_refused, refused,
)

from flowcut_kernels import flowcut, remove_flowcut
from flowcut_kernels.models.registry import FlowCutConfig

pytest.importorskip("PIL", reason="transformers' image processors need Pillow")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K = 5
SINGLE = ["w1 <start_of_image> w2 w3"]
PAIR = ["w1 w2 w3 w4 <start_of_image> w5 w6 w7", "w8 <start_of_image> w9"]
TWO = ["w1 <start_of_image> w2 <start_of_image> w3 w4", "w5 <start_of_image> w6"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def images(count, seed=0):
    """``count`` random images, the i-th (24 + 8·i) × 40 pixels."""
    return random_images([(24 + 8 * i, 40) for i in range(count)], seed)


def nested(prompts, seed=0):
    """The processor's images argument: one list per prompt, as many images as it has <start_of_image>."""
    flat = iter(images(sum(p.count("<start_of_image>") for p in prompts), seed))
    return [[next(flat) for _ in range(p.count("<start_of_image>"))] for p in prompts]


def patched(target=K, **kwargs):
    model = random_gemma3(**kwargs)
    processor = tiny_gemma3_processor(model)
    flowcut(model, target, processor=processor)
    return model, processor


def count(batch):
    return (torch.as_tensor(batch["input_ids"]) == IMAGE).sum(1).tolist()


# --- the recipe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 2e-3)], ids=["float64", "float32"])
@pytest.mark.parametrize("prompts", [SINGLE, PAIR, TWO], ids=["single", "left-padded pair", "two images"])
def test_prefill_equals_oracle(prompts, dtype, rtol):
    """Kept windows exact; logits to rtol of their largest (Gemma's RMSNorm runs in float32 even in a float64
    model; float32 noise grows through the sharpened tower)."""
    model, processor = patched(dtype=dtype)
    batch = processor(text=prompts, images=nested(prompts), padding=True, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    mask = batch["attention_mask"]
    assert len(prompts) == 1 or (mask == 0).any()
    expected, kept = naive_logits(model, batch["input_ids"], mask, batch["pixel_values"], K)
    features = model.model.get_image_features(batch["pixel_values"])
    for got, want in zip(features.keep_indices, kept):
        assert torch.equal(got, want)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(**batch, position_ids=positions).logits[:, -1].double()
    assert (logits - expected).abs().max() <= rtol * expected.abs().max()


def test_image_tokens_attend_to_each_other_both_ways():
    """The stock bidirectional mask covers the K kept tokens: without token_type_ids (causal) the logits differ."""
    model, processor = patched()
    batch = processor(text=SINGLE, images=nested(SINGLE), return_tensors="pt")
    assert batch["token_type_ids"].sum() == K and bool((batch["token_type_ids"] == (batch["input_ids"] == IMAGE)).all())
    both = model(**batch).logits[:, -1]
    causal = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits[:, -1]
    assert (both - causal).abs().max() > 1e-3


def test_unpruned_windows_equal_stock():
    """At K = every window the recipe prunes nothing: the window reorder, the scatter back and the stock projector
    give the stock features; pruned, every kept token is one whole window. (float64: the reorder changes the
    attention's summation order, which float32 rounding would show.)"""
    model, processor = patched(dtype=torch.float64)
    pixels = processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt")["pixel_values"].double()
    stock = copy.deepcopy(model)
    remove_flowcut(stock)
    windows = model.config.mm_tokens_per_image
    model.model.flowcut_config = FlowCutConfig(windows, -1, "auto")
    everything = model.model.get_image_features(pixels)
    assert torch.equal(everything.keep_indices, torch.arange(windows).expand(len(pixels), -1))
    assert torch.allclose(everything.pooler_output, stock.model.get_image_features(pixels).pooler_output,
                          rtol=1e-9, atol=1e-12)
    model.model.flowcut_config = FlowCutConfig(K, -1, "auto")
    out = model.model.get_image_features(pixels)
    assert out.pooler_output.shape == (len(pixels), K, 32) and out.last_hidden_state.shape == (len(pixels), 4 * K, 32)
    mean = out.last_hidden_state.view(len(pixels), K, 4, 32).mean(2)  # each kept window's 4 patches, pooled
    projector = model.model.multi_modal_projector
    tokens = projector.mm_soft_emb_norm(mean) @ projector.mm_input_projection_weight
    assert torch.allclose(out.pooler_output, tokens, rtol=1e-6, atol=1e-6)  # Gemma's RMSNorm runs in float32
    assert all(t[-1] == 4 * K and t[0] == 64 for t in out.tokens_per_layer)


def test_images_are_pruned_independently_of_their_batch():
    model, processor = patched(dtype=torch.float64)
    pixels = processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt")["pixel_values"].double()
    together = model.model.get_image_features(pixels)
    for i in range(len(pixels)):
        alone = model.model.get_image_features(pixels[i : i + 1])
        assert torch.equal(alone.keep_indices[0], together.keep_indices[i])
        assert torch.allclose(alone.pooler_output[0], together.pooler_output[i], rtol=1e-9, atol=1e-12)
    assert len({tuple(t) for t in together.tokens_per_layer}) > 1  # the schedules differ: a real per-image test


def test_one_host_read_per_prune_step():
    """Hn of every image is read once per prune step before the last; nothing else is read back."""
    from host_reads import HostReads

    model, processor = patched()
    pixels = processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt")["pixel_values"]
    with HostReads() as reads:
        out = model.model.get_image_features(pixels)
    layers = len(out.tokens_per_layer[0])
    steps = sum(1 for i in range(layers - 1) if (layers - 2 - i) % 2 == 0 and layers - 2 - i > 0)
    assert steps and len(reads.reads) == steps, reads.reads


# --- generate -------------------------------------------------------------------------------------


def test_generate_batched_equals_single_and_cache():
    model, processor = patched()
    batch = processor(text=TWO, images=nested(TWO), padding=True, return_tensors="pt")
    new = 5
    out = model.generate(**batch, max_new_tokens=new)
    flat = iter(images(3))
    for i, prompt in enumerate(TWO):
        mine = [next(flat) for _ in range(prompt.count("<start_of_image>"))]
        single = processor(text=[prompt], images=[mine], return_tensors="pt")
        assert torch.equal(model.generate(**single, max_new_tokens=new)[0, -new:], out[i, -new:])
    assert torch.equal(model.generate(**batch, max_new_tokens=new, use_cache=False), out)


def test_generate_beams_and_several_sequences():
    model, processor = patched()
    batch = processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + 3)
    for i, prompt in enumerate(PAIR):  # each prompt's best beam is its own single-prompt one
        single = processor(text=[prompt], images=[nested(PAIR)[i]], return_tensors="pt")
        assert torch.equal(model.generate(**single, max_new_tokens=3, num_beams=2)[0, -3:], out[2 * i, -3:])


def test_bfloat16_is_finite():
    model, processor = patched(dtype=torch.bfloat16)
    batch = processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt")
    assert_bfloat16_finite(model, batch)


# --- processor, per instance, reversible ---------------------------------------------------------


@pytest.mark.parametrize("target", [1, 5, 15])
def test_processor_emits_target_tokens(target):
    model = random_gemma3()
    processor, other = tiny_gemma3_processor(model), tiny_gemma3_processor(model)
    stock = count(processor(text=TWO, images=nested(TWO), padding=True))
    assert stock == [32, 16]
    flowcut(model, target, processor=processor)
    batch = processor(text=TWO, images=nested(TWO), padding=True, return_tensors="pt")
    assert count(batch) == [2 * target, target]
    assert bool((batch["token_type_ids"] == (batch["input_ids"] == IMAGE)).all())
    ids = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert ids[ids.index(BOI):ids.index(EOI) + 1] == [BOI] + [IMAGE] * target + [EOI]
    assert count(other(text=TWO, images=nested(TWO), padding=True)) == stock
    remove_flowcut(model)
    assert count(processor(text=TWO, images=nested(TWO), padding=True)) == stock


def test_remove_gives_back_the_stock_model_and_processor():
    model, plain = random_gemma3(seed=3), random_gemma3(seed=3)
    processor = tiny_gemma3_processor(model)
    batch = lambda: processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt")
    check_remove_gives_back(model, plain, processor, batch, K, new_tokens=4)


def test_gemma3_model_alone():
    core = random_gemma3().model
    processor = tiny_gemma3_processor(random_gemma3())
    flowcut(core, K, processor=processor)
    out = core(**processor(text=PAIR, images=nested(PAIR), padding=True, return_tensors="pt"))
    assert out.last_hidden_state.shape[0] == 2
    remove_flowcut(core)
    assert "get_image_features" not in vars(core)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_arguments_leave_model_unchanged():
    model = random_gemma3()
    refused(model, r"target_num", target_num=16)
    refused(model, r"target_num", target_num=0)
    refused(model, r"llm_stage=True: the language-model stage is not available for Gemma 3", target_num=K,
            llm_stage=True)
    refused(model, r"feature_layer=-2", target_num=K, feature_layer=-2)
    refused(model, "backend='nope'", target_num=K, backend="nope")
    refused(model, "static schedule", target_num=K, schedule=object())


def test_mismatched_processors_are_refused():
    model = random_gemma3()
    other = tiny_gemma3_processor(random_gemma3(mm_tokens_per_image=4))
    refused(model, r"processor does not match the model: its image_seq_length 4", other, target_num=K,
            processor=other)
    check_shared_processor_refused(model, tiny_gemma3_processor(model), random_gemma3(), K)


def test_mismatched_placeholders_name_the_processor():
    model = random_gemma3()
    stock = tiny_gemma3_processor(model)(text=SINGLE, images=nested(SINGLE), return_tensors="pt")
    check_stock_placeholders_refused(model, stock, K)

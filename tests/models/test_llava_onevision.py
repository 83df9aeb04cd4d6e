"""flowcut() on HF LLaVA-OneVision (SigLIP tower, anyres, images): the recipe against a float64 oracle
(tests/oracle/llava_onevision.py), generate, per instance and reversible, bad inputs.

Tiny random models (tests/tiny/llava_onevision.py: SigLIP 32 px crops of 8 × 8 patches, 6 layers; grid resolutions
32×64, 64×32, 64×64, 32×96, 96×32 → 3 to 5 crops per image; a 2-layer Qwen2 decoder), the tower's q/k sharpened.
"""


import pytest
import torch
from oracle.llava_next import naive_logits
from oracle.lm_stage import naive_lm_stage
from oracle.llava_onevision import naive_onevision_features
from tiny.gemma3 import random_gemma3, tiny_gemma3_processor
from tiny.llava_onevision import IMAGE, random_onevision, tiny_onevision_processor
from vlm_cases import (
    random_images,
    assert_bfloat16_finite, check_generate_batched, check_remove_gives_back,
    check_shared_processor_refused, check_stock_placeholders_refused, refused,
)

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut

pytest.importorskip("PIL", reason="transformers' image processors need Pillow")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K = 10  # each anyres crop keeps 5 patches; a multi-image prompt's image keeps 10 of its base crop
SINGLE = ["w1 <image> w2 w3"]
PAIR = ["w1 <image> w2 w3 w4 w5 w6", "w7 <image> w8"]
TWO = ["w1 <image> w2 <image> w3", "w4 <image> w5"]  # the first prompt's two images are single crops


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def nested(prompts, sizes):
    flat = iter(random_images(sizes))
    return [[next(flat) for _ in range(p.count("<image>"))] for p in prompts]


def patched(target=K, llm_stage=None, **kwargs):
    model = random_onevision(**kwargs)
    processor = tiny_onevision_processor(model)
    flowcut(model, target, processor=processor, llm_stage=llm_stage)
    return model, processor


def count(batch):
    return (torch.as_tensor(batch["input_ids"]) == IMAGE).sum(1).tolist()


CASES = {
    "single": (SINGLE, [(40, 70)]),  # a 2×2 grid with an unpadding margin
    "left-padded pair": (PAIR, [(30, 90), (64, 64)]),
    "two images in a prompt": (TWO, [(30, 90), (64, 32), (40, 70)]),
}


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("case", CASES)
def test_prefill_equals_oracle(case, llm_stage):
    prompts, sizes = CASES[case]
    model, processor = patched(dtype=torch.float64, llm_stage=llm_stage)
    assert model.flowcut_config.llm_stage == llm_stage
    batch = processor(text=prompts, images=nested(prompts, sizes), padding=True, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].double()
    assert len(prompts) == 1 or (batch["attention_mask"] == 0).any()
    want, sources = naive_onevision_features(model, batch["pixel_values"], batch["image_sizes"],
                                             batch["batch_num_images"].tolist(), K, llm_stage)
    got = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                         batch_num_images=batch["batch_num_images"])
    for mine, theirs, where, source in zip(got.pooler_output, want, got.keep_indices, sources):
        assert [tuple(x) for x in where.tolist()] == source
        assert torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12)
    widths = [len(w) for w in want]
    if llm_stage:
        assert all(w > K for w in widths)
        expected = naive_lm_stage(model, batch["input_ids"], batch["attention_mask"], want, K)[0]
    else:
        assert widths == [K] * len(want)
        expected = naive_logits(model, batch["input_ids"], batch["attention_mask"], want, K)
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    logits = model(**batch, position_ids=positions).logits[:, -1]
    assert (logits - expected).abs().max() <= 1e-6 * expected.abs().max()  # the RMSNorms run in float32


def test_float32_keeps_the_oracles_patches():
    model, processor = patched(llm_stage=False)
    prompts, sizes = CASES["two images in a prompt"]
    batch = processor(text=prompts, images=nested(prompts, sizes), padding=True, return_tensors="pt")
    _, sources = naive_onevision_features(model, batch["pixel_values"], batch["image_sizes"],
                                          batch["batch_num_images"].tolist(), K)
    got = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                         batch_num_images=batch["batch_num_images"])
    assert [[tuple(x) for x in where.tolist()] for where in got.keep_indices] == sources
    assert bool(model(**batch).logits.isfinite().all())
    alone = processor(text=SINGLE, images=random_images([(40, 70)]), return_tensors="pt")  # without batch_num_images:
    features = model.model.get_image_features(alone["pixel_values"], alone["image_sizes"])  # each image anyres
    assert features.keep_indices[0][:, 0].max() > 0 and features.pooler_output[0].shape == (K, 32)


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
def test_generate_batched_equals_single_and_cache(llm_stage):
    model, processor = patched(llm_stage=llm_stage)
    prompts, sizes = CASES["two images in a prompt"]
    batch = processor(text=prompts, images=nested(prompts, sizes), padding=True, return_tensors="pt")
    per_prompt = nested(prompts, sizes)
    singles = [processor(text=[prompt], images=[per_prompt[i]], return_tensors="pt")
               for i, prompt in enumerate(prompts)]
    check_generate_batched(model, batch, singles, 5, llm_stage)


def test_generate_beams_keep_each_prompts_images():
    model, processor = patched()
    prompts, sizes = CASES["two images in a prompt"]
    batch = processor(text=prompts, images=nested(prompts, sizes), padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + 3)


def test_bfloat16_is_finite():
    model, processor = patched(dtype=torch.bfloat16)
    batch = processor(text=PAIR, images=nested(PAIR, [(30, 90), (64, 64)]), padding=True, return_tensors="pt")
    assert_bfloat16_finite(model, batch)


# --- processor, per instance, reversible ---------------------------------------------------------


@pytest.mark.parametrize("target", [2, 10, 63])
def test_processor_emits_target_placeholders(target):
    model = random_onevision()
    processor, other = tiny_onevision_processor(model), tiny_onevision_processor(model)
    sizes = [(30, 90), (64, 32), (40, 70)]
    stock = count(processor(text=TWO, images=nested(TWO, sizes), padding=True))
    flowcut(model, target, processor=processor, llm_stage=target < 32)  # the stage needs 2·target below 64
    assert count(processor(text=TWO, images=nested(TWO, sizes), padding=True)) == [2 * target, target]
    assert count(other(text=TWO, images=nested(TWO, sizes), padding=True)) == stock
    remove_flowcut(model)
    assert count(processor(text=TWO, images=nested(TWO, sizes), padding=True)) == stock


def test_remove_gives_back_the_stock_model_and_processor():
    model, plain = random_onevision(seed=3), random_onevision(seed=3)
    processor = tiny_onevision_processor(model)
    sizes = [(30, 90), (64, 64)]
    batch = lambda: processor(text=PAIR, images=nested(PAIR, sizes), padding=True, return_tensors="pt")
    check_remove_gives_back(model, plain, processor, batch, K, new_tokens=4)


def test_videos_are_refused():
    model, _ = patched()
    with pytest.raises(FlowCutInputError, match="videos are not supported"):
        model(input_ids=torch.tensor([[5, 6]]), pixel_values_videos=torch.zeros(1, 2, 3, 32, 32))


# --- bad input ------------------------------------------------------------------------------------


def test_bad_arguments_leave_model_unchanged():
    model = random_onevision()
    refused(model, "target_num=64 is out of range", target_num=64)
    refused(model, "target_num=1 is out of range", target_num=1)
    refused(model, "feature_layer=-2 differs", target_num=K, feature_layer=-2)
    refused(model, "backend='nope'", target_num=K, backend="nope")
    refused(model, "target_num=32 is too large for llm_stage=True", target_num=32)
    refused(model, "llm_stage must be True, False or None", target_num=K, llm_stage="yes")
    assert flowcut(random_onevision(), 32, llm_stage=False).flowcut_config.target_num == 32
    refused(model, "static schedule", target_num=K, schedule=object())
    two_crops = random_onevision(image_grid_pinpoints=[[32, 32], [32, 64]])
    refused(two_crops, r"target_num=9 is more than the tower stage keeps from an image of 2 crops", target_num=9)


def test_mismatched_processors_are_refused():
    model = random_onevision()
    gemma = tiny_gemma3_processor(random_gemma3())
    refused(model, r"processor is a Gemma3Processor", gemma, target_num=K, processor=gemma)
    other = tiny_onevision_processor(random_onevision(image_grid_pinpoints=[[32, 64], [64, 32]]))
    refused(model, r"processor does not match the model: its image_grid_pinpoints", other, target_num=K,
            processor=other)
    check_shared_processor_refused(model, tiny_onevision_processor(model), random_onevision(), K)


def test_mismatched_placeholders_name_the_processor():
    model = random_onevision()
    stock = tiny_onevision_processor(model)(text=SINGLE, images=random_images([(32, 64)]), return_tensors="pt")
    check_stock_placeholders_refused(model, stock, K)

"""flowcut() on HF LLaVA-NeXT (anyres): the recipe against a float64 oracle, generate, per instance and reversible.

Tiny random models (random_llava_next: CLIP tower with 32 px crops / patch 4 → 64 patches, 6 layers; grid
resolutions 32×64, 64×32, 64×64, 32×96, 96×32 → 3 to 5 crops per image; Llama text model with 4 layers), the tower's
q/k and the decoder's q/k/v sharpened. The independent reference is tests/oracle/llava_next.py (float64).
"""


import pytest
import torch
from oracle.llava_next import naive_logits, naive_next_features
from oracle.lm_stage import naive_lm_stage

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut
from tiny.llava import random_llava, tiny_llava_processor
from tiny.llava_next import random_llava_next, tiny_llava_next_processor
from tiny.text import TINY_WORDS
from vlm_cases import (
    random_images,
    check_generate_batched, check_remove_gives_back,
    check_shared_processor_refused, check_stock_placeholders_refused, refused,
)
from flowcut_kernels.models import seams
from flowcut_kernels.models.registry import find_tower

pytest.importorskip("PIL", reason="transformers' image processors need Pillow")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K = 10  # each crop keeps 5 patches
IMAGE = len(TINY_WORDS)  # the <image> token id
# (H, W): grids 1×2, 2×1, 2×2, 1×3, 3×1 and a 2×2 with an unpadding margin.
SIZES = [(32, 64), (64, 32), (50, 50), (30, 90), (90, 30), (40, 70)]
SINGLE = ["USER: <image> w1 w2 w3 w4 ASSISTANT:"]
PAIR = ["USER: <image> w1 w2 w3 w4 w5 w6 ASSISTANT:", "USER: w7 <image> ASSISTANT:"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def tiny_next(seed=0, sharpen=8.0, **kwargs):
    """A tiny LLaVA-NeXT whose decoder's q/k/v are multiplied by ``sharpen``."""
    model = random_llava_next(seed=seed, sharpen=8.0, text={"num_hidden_layers": 4}, **kwargs)
    for layer in model.model.language_model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight.mul_(sharpen)
    return model


def patched(llm_stage=True, target=K, **kwargs):
    """A patched tiny model, its processor and a stock twin."""
    model = tiny_next(**kwargs)
    processor = tiny_llava_next_processor(model)
    flowcut(model, target, processor=processor, llm_stage=llm_stage)
    return model, processor, tiny_next(**kwargs)


def count(batch):
    return (torch.as_tensor(batch["input_ids"]) == IMAGE).sum(1).tolist()


def assert_close(got, want, rtol=1e-4):
    """Each row within ``rtol`` of the reference, relative to its norm."""
    error = (got.double() - want).norm(dim=-1)
    assert bool((error <= rtol * want.norm(dim=-1)).all()), (error / want.norm(dim=-1)).tolist()


# --- the recipe -----------------------------------------------------------------------------------


CASES = {
    "single": (SINGLE, [(40, 70)], K),
    "pair": (PAIR, [(30, 90), (64, 64)], K),
    # A 1×3 grid whose unpadded part is 2 patch rows (48 patches): at most 50 + 48 < 100 survive, margin ones make up
    # the rest.
    "margin-top-up": (SINGLE, [(6, 91)], 100),
}


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("case", CASES)
def test_prefill_equals_oracle(llm_stage, case):
    prompts, sizes, target = CASES[case]
    model, processor, twin = patched(llm_stage, target)
    batch = processor(text=prompts, images=random_images(sizes), padding=True, return_tensors="pt")
    assert count(batch) == [target] * len(prompts)
    logits = model(**batch).logits[:, -1]

    want, sources = naive_next_features(twin, batch["pixel_values"], batch["image_sizes"], target, llm_stage)
    got = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    assert [w.tolist() for w in got.keep_indices] == [[list(s) for s in source] for source in sources]
    for mine, theirs in zip(got.pooler_output, want):
        assert_close(mine, theirs)
    widths = [len(w) for w in want]
    if not llm_stage:
        assert widths == [target] * len(sizes)
        reference = naive_logits(twin, batch["input_ids"], batch["attention_mask"], want, target)
    else:
        assert widths == [target] if case == "margin-top-up" else all(w > target for w in widths)
        reference = naive_lm_stage(twin, batch["input_ids"], batch["attention_mask"], want, target)[0]
    assert_close(logits, reference)


def test_crops_of_an_image_share_one_schedule_and_images_are_independent():
    model, processor, _ = patched()
    batch = processor(text=SINGLE * 3, images=random_images(SIZES[:3], seed=1), padding=True, return_tensors="pt")
    calls = []
    first = find_tower(model.model.vision_tower).layers[0]
    first.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    together = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    assert calls == [3 + 3 + 5]  # every crop of the batch in one tower pass
    assert together.last_hidden_state.shape == (11, 1 + K // 2, 32)
    for g in range(3):
        alone = model.model.get_image_features(batch["pixel_values"][g : g + 1], batch["image_sizes"][g : g + 1])
        assert torch.equal(alone.keep_indices[0], together.keep_indices[g])
        assert alone.tokens_per_layer[0] == together.tokens_per_layer[g]
        torch.testing.assert_close(alone.pooler_output[0], together.pooler_output[g], rtol=1e-5, atol=1e-5)


# --- generate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
def test_generate_batched_equals_single_and_cache(llm_stage):
    model, processor, _ = patched(llm_stage)
    sizes = [(30, 90), (64, 64)]
    batch = processor(text=PAIR, images=random_images(sizes), padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # left-padded
    singles = [processor(text=[prompt], images=random_images(sizes)[i : i + 1], return_tensors="pt")
               for i, prompt in enumerate(PAIR)]
    check_generate_batched(model, batch, singles, 6, llm_stage)


def test_generate_beams_keep_each_prompts_images():
    model, processor, _ = patched()
    batch = processor(text=["USER: <image> w1 <image> ASSISTANT:", "USER: <image> w2 ASSISTANT:"],
                      images=random_images(SIZES[:3]), padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + 3)


# --- processor, per instance, reversible ---------------------------------------------------------


@pytest.mark.parametrize("target", [2, 10, 64])
def test_processor_emits_target_placeholders(target):
    model = tiny_next()
    processor, other = tiny_llava_next_processor(model), tiny_llava_next_processor(model)
    stock = count(processor(text=SINGLE * len(SIZES), images=random_images(SIZES), padding=True))
    assert len(set(stock)) > 1  # the stock count depends on the size
    flowcut(model, target, processor=processor)
    batch = processor(text=SINGLE * len(SIZES), images=random_images(SIZES), padding=True)
    assert count(batch) == [target] * len(SIZES)
    assert count(processor(text="USER: <image> <image> w1", images=random_images(SIZES[:2]))) == [2 * target]
    assert count(other(text=SINGLE * len(SIZES), images=random_images(SIZES), padding=True)) == stock
    remove_flowcut(model)
    assert count(processor(text=SINGLE * len(SIZES), images=random_images(SIZES), padding=True)) == stock


def test_remove_gives_back_the_stock_model_and_processor():
    model, plain = tiny_next(seed=3), tiny_next(seed=3)
    processor = tiny_llava_next_processor(model)
    batch = lambda: processor(text=PAIR, images=random_images([(30, 90), (64, 64)]), padding=True,
                              return_tensors="pt")
    clone = check_remove_gives_back(model, plain, processor, batch, K, new_tokens=5)
    assert clone.flowcut_config.llm_stage  # the recipe's default for LLaVA-NeXT


def test_llava_next_model_alone():
    core = tiny_next().model
    processor = tiny_llava_next_processor(tiny_next())
    flowcut(core, K, processor=processor, llm_stage=False)
    out = core(**processor(text=PAIR, images=random_images([(30, 90), (64, 64)]), padding=True, return_tensors="pt"))
    assert seams.image_features(out).shape == (2 * K, 32)
    remove_flowcut(core)
    assert "get_image_features" not in vars(core)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_arguments_leave_model_unchanged():
    model = tiny_next()
    refused(model, "target_num=128 is out of range", target_num=128)
    refused(model, "target_num=1 is out of range", target_num=1)
    refused(model, "feature_layer=-1 differs", target_num=8, feature_layer=-1)
    refused(model, "backend='nope'", target_num=8, backend="nope")
    refused(model, "llm_stage must be True, False or None", target_num=8, llm_stage="yes")
    two_crops = tiny_next(image_grid_pinpoints=[[32, 32], [32, 64]])
    refused(two_crops, r"target_num=9 is more than the tower stage keeps from an image of 2 crops.*even", target_num=9)
    assert flowcut(two_crops, 10).flowcut_config.target_num == 10


def test_unsupported_configurations_are_refused():
    refused(tiny_next(vision_feature_layer=[-2, -1]), r"selects several feature layers", target_num=8)
    refused(tiny_next(vision_feature_select_strategy="full"), "'full' is not supported", target_num=8)
    model = flowcut(tiny_next(), 8)
    pixels = torch.zeros(1, 3, 3, 32, 32)
    with pytest.raises(FlowCutInputError, match="selects several feature layers"):
        model.model.get_image_features(pixels, torch.tensor([[32, 64]]), vision_feature_layer=[-2, -1])
    with pytest.raises(FlowCutInputError, match="image_sizes are required"):
        model.model.get_image_features(pixels, None)


def test_mismatched_processors_are_refused():
    model = tiny_next()
    llava_processor = tiny_llava_processor(random_llava())
    refused(model, r"processor is a LlavaProcessor; pass the model.s LlavaNextProcessor", llava_processor,
            target_num=8, processor=llava_processor)
    other = tiny_llava_next_processor(tiny_next(image_grid_pinpoints=[[32, 64], [64, 32]]))
    refused(model, r"processor does not match the model: its image_grid_pinpoints", other, target_num=8,
            processor=other)
    check_shared_processor_refused(model, tiny_llava_next_processor(model), tiny_next(), 8)


def test_mismatched_placeholders_name_the_processor():
    model = tiny_next()
    processor = tiny_llava_next_processor(model)
    stock = processor(text=SINGLE, images=random_images([(32, 64)]), return_tensors="pt")
    for llm_stage in (True, False):
        check_stock_placeholders_refused(model, stock, K, llm_stage=llm_stage)

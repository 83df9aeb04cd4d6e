"""flowcut() on HF LLaVA-OneVision (SigLIP tower, anyres, images and videos): the recipe against a float64 oracle
(tests/oracle/llava_onevision.py; the video recipe's selection written out here), generate, per instance and
reversible, bad inputs.

Tiny random models (tests/tiny/llava_onevision.py: SigLIP 32 px crops of 8 × 8 patches, 6 layers; grid resolutions
32×64, 64×32, 64×64, 32×96, 96×32 → 3 to 5 crops per image; a 2-layer Qwen2 decoder), the tower's q/k sharpened.
"""


import copy
import math
from types import SimpleNamespace

import pytest
import torch
from oracle.llava_next import naive_logits
from oracle.lm_stage import naive_lm_stage
from oracle.llava_onevision import _tower, naive_onevision_features
from tiny.gemma3 import random_gemma3, tiny_gemma3_processor
from tiny.llava_onevision import IMAGE, VIDEO, random_onevision, tiny_onevision_processor
from tiny.text import TINY_WORDS
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


# --- videos: K tokens per video ------------------------------------------------------------------


def naive_video_features(model, videos, target_num):
    """The oracle of the video recipe: per video (F, 3, S, S), its frames through the SigLIP layers with the batch rule
    over them (oracle/llava_onevision.py), each keeping ⌈K/F⌉; then the K with the best last S_cum (ties: the earlier
    frame, then the lower patch), in frame and patch order. Returns each video's projected features (K, C) float64
    and its (frame, patch) pairs."""
    core = model.model
    tower = getattr(core.vision_tower, "vision_model", core.vision_tower)
    layer = core.config.vision_feature_layer
    feature_layer = layer if layer < 0 else layer - (core.config.vision_config.num_hidden_layers + 1)
    projector = copy.deepcopy(core.multi_modal_projector).double()
    features, sources = [], []
    for frames in videos:
        per_frame = math.ceil(target_num / len(frames))
        feats, index, cum = _tower(tower, frames, per_frame, feature_layer)
        cum, index = cum.flatten().tolist(), index.flatten().tolist()
        chosen = sorted(sorted(range(len(cum)), key=lambda j: (-cum[j], j))[:target_num])
        features.append(projector(feats.flatten(0, 1)[chosen]))
        sources.append([(j // per_frame, index[j]) for j in chosen])
    return features, sources


def with_video_rows(model, input_ids, video_features):
    """The oracles' view of a prompt batch with videos: a stand-in model whose embedding table has one extra row per
    video placeholder (its video feature), and the ids with each placeholder as its own row's token."""
    text = model.model.language_model
    ids = input_ids.clone()
    marks = ids == VIDEO
    ids[marks] = text.embed_tokens.weight.shape[0] + torch.arange(int(marks.sum()))
    table = torch.cat([text.embed_tokens.weight.double(), *[f.double() for f in video_features]])
    stand_in = SimpleNamespace(config=text.config, layers=text.layers, norm=text.norm,
                               embed_tokens=SimpleNamespace(weight=table))
    return SimpleNamespace(model=SimpleNamespace(language_model=stand_in), lm_head=model.lm_head,
                           config=model.config), ids


STAND_IN = "w56"  # the tiny processor refuses <video> without videos: the prompts hold this word in their place
V = " ".join([STAND_IN] * K)
VIDEO_CASES = {  # prompts, image sizes, videos (V, F) as frames of 32 px
    "video": (["w1 " + V + " w2 w3"], [], (1, 3)),
    "image and video batch": (["w1 <image> w2 w3 w4 w5", "w6 " + V + " w7"], [(40, 70)], (1, 4)),
    "image and videos in prompts": (["w1 <image> w2 " + V + " w3", "w4 " + V + " w5 w6 w7 w8"], [(30, 90)], (2, 5)),
}


def video_batch(processor, case, dtype=torch.float32):
    """The processor's batch for a :data:`VIDEO_CASES` case, with seeded random ``pixel_values_videos`` (the tiny
    processor has no video processor: the prompts get K ``<video>`` tokens per video, as the patched one writes)."""
    prompts, sizes, (videos, frames) = VIDEO_CASES[case]
    images = nested(prompts, sizes) if sizes else None
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    batch["input_ids"][batch["input_ids"] == TINY_WORDS.index(STAND_IN)] = VIDEO
    generator = torch.Generator().manual_seed(1)
    batch["pixel_values_videos"] = torch.randn(videos, frames, 3, 32, 32, generator=generator).to(dtype)
    if sizes:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("case", VIDEO_CASES)
def test_video_prefill_equals_oracle(case, llm_stage):
    model, processor = patched(dtype=torch.float64, llm_stage=llm_stage)
    batch = video_batch(processor, case, torch.float64)
    videos, frames = batch["pixel_values_videos"].shape[:2]
    want, sources = naive_video_features(model, batch["pixel_values_videos"], K)
    got = model.model.get_video_features(batch["pixel_values_videos"])
    assert got.pooler_output.shape == (videos, K, 32)  # exactly K tokens per video, no newline
    assert [[tuple(x) for x in where.tolist()] for where in got.keep_indices] == sources
    assert all(torch.bincount(where[:, 0]).max() <= math.ceil(K / frames) for where in got.keep_indices)
    assert torch.allclose(got.pooler_output, torch.stack(want), rtol=1e-9, atol=1e-12)
    images = []
    if "pixel_values" in batch:
        images, _ = naive_onevision_features(model, batch["pixel_values"], batch["image_sizes"],
                                             batch["batch_num_images"].tolist(), K, llm_stage)
    stand_in, ids = with_video_rows(model, batch["input_ids"], want)
    if llm_stage and images:
        expected = naive_lm_stage(stand_in, ids, batch["attention_mask"], images, K)[0]
    else:
        expected = naive_logits(stand_in, ids, batch["attention_mask"], images, K)
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    out = model(**batch, position_ids=positions)
    logits = out.logits[:, -1]
    assert (logits - expected).abs().max() <= 1e-6 * expected.abs().max()
    video_out = getattr(out, "video_outputs", None)
    reached = video_out.pooler_output if video_out is not None else out.video_hidden_states
    assert reached.reshape(-1, 32).shape == (videos * K, 32)


def test_video_frames_share_one_schedule_and_split_k():
    model, _ = patched(target=12, llm_stage=False)
    pixels = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = model.model.get_video_features(pixels)
    assert got.pooler_output.shape == (2, 12, 32)
    for where, tokens in zip(got.keep_indices, got.tokens_per_layer):
        assert torch.bincount(where[:, 0], minlength=4).tolist() == [3, 3, 3, 3]  # K divisible by F: K/F each
        assert tokens[-1] == 3
    alone = model.model.get_video_features(pixels[1:])  # videos are independent
    assert torch.equal(alone.keep_indices[0], got.keep_indices[1])
    assert torch.allclose(alone.pooler_output[0], got.pooler_output[1], atol=1e-6)


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
def test_video_generate_batched_equals_single_and_cache(llm_stage):
    model, processor = patched(llm_stage=llm_stage)
    batch = video_batch(processor, "image and video batch")
    prompts, sizes, _ = VIDEO_CASES["image and video batch"]
    first = processor(text=prompts[:1], images=nested(prompts[:1], sizes), return_tensors="pt")
    second = processor(text=prompts[1:], return_tensors="pt")
    second["input_ids"][second["input_ids"] == TINY_WORDS.index(STAND_IN)] = VIDEO
    second["pixel_values_videos"] = batch["pixel_values_videos"]
    check_generate_batched(model, batch, [first, second], 5, llm_stage)


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
def test_video_beams_keep_each_prompts_video(llm_stage):
    model, processor = patched(llm_stage=llm_stage)
    batch = video_batch(processor, "image and videos in prompts")
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    second = {"input_ids": batch["input_ids"][1:], "attention_mask": batch["attention_mask"][1:],
              "pixel_values_videos": batch["pixel_values_videos"][1:]}
    alone = model.generate(**second, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + 3) and torch.equal(out[2:, -3:], alone[:, -3:])


def test_video_bfloat16_is_finite():
    model, processor = patched(dtype=torch.bfloat16)
    assert_bfloat16_finite(model, video_batch(processor, "image and videos in prompts", torch.bfloat16))


def test_processor_emits_target_video_placeholders():
    import transformers.processing_utils as processing

    if not hasattr(processing.ProcessorMixin, "replace_video_token"):
        pytest.skip("transformers 5.0's LlavaOnevisionProcessor counts video tokens inside __call__ (no hook)")
    model = random_onevision()
    processor = tiny_onevision_processor(model)
    videos = {"pixel_values_videos": [torch.zeros(4, 3, 32, 32)]}
    stock = processor.replace_video_token(videos, video_idx=0)
    assert stock.count("<video>") == 4 * 16 + 1
    flowcut(model, K, processor=processor)
    assert processor.replace_video_token(videos, video_idx=0) == "<video>" * K
    flowcut(model, 6)  # a re-apply keeps the processor, now counting 6
    assert processor.replace_video_token(videos, video_idx=0) == "<video>" * 6
    remove_flowcut(model)
    assert processor.replace_video_token(videos, video_idx=0) == stock


def test_remove_gives_back_stock_videos():
    model, plain = random_onevision(seed=3), random_onevision(seed=3)
    ids = torch.tensor([[5] + [VIDEO] * (2 * 16 + 1) + [6]])
    pixels = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    flowcut(model, K)
    assert model.model.get_video_features(pixels).pooler_output.shape == (1, K, 32)
    remove_flowcut(model)
    assert torch.equal(model(input_ids=ids, pixel_values_videos=pixels).logits,
                       plain(input_ids=ids, pixel_values_videos=pixels).logits)


def test_bad_videos_are_refused():
    model, processor = patched()
    batch = video_batch(processor, "video")
    stock = batch["input_ids"].clone()
    stock = torch.cat([stock, torch.full((1, 3), VIDEO)], 1)
    with pytest.raises(FlowCutInputError, match=f"hold {K + 3} video placeholder tokens, but FlowCut gives the "
                                                f"language model {K} for 1 video"):
        model(input_ids=stock, pixel_values_videos=batch["pixel_values_videos"])
    with pytest.raises(FlowCutInputError, match=r"pixel_values_videos must be a \(videos, frames, 3, height, width\)"):
        model(input_ids=batch["input_ids"], pixel_values_videos=batch["pixel_values_videos"][0])
    with pytest.raises(FlowCutInputError, match="at least one frame"):
        model.model.get_video_features(batch["pixel_values_videos"][:, :0])
    with pytest.raises(FlowCutInputError, match="output_hidden_states=True is unavailable"):
        model.model.get_video_features(batch["pixel_values_videos"], output_hidden_states=True)

"""FlowCut on Qwen2-VL and Qwen2.5-VL, tower stage alone and with the language-model stage (the default): the
float64 oracles, batches, generation, dtypes, reversibility, bad inputs; Qwen2.5-VL's window order."""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from oracle.qwen2_vl import group_windows, naive_logits, naive_stage_logits, patch_coordinates

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut
from flowcut_kernels.models.qwen2_vl import windows
from tiny.qwen import random_qwen2_5_vl, random_qwen2_vl, tiny_qwen2_5_vl_processor, tiny_qwen2_vl_processor
from tiny.text import QWEN_WORDS

IMAGE, VIDEO, START, END = (QWEN_WORDS.index(w) for w in
                             ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
TARGET = 5
#: name → (model builder, processor builder)
MODELS = {
    "qwen2_vl": (random_qwen2_vl, tiny_qwen2_vl_processor),
    "qwen2_5_vl": (random_qwen2_5_vl, tiny_qwen2_5_vl_processor),
}


def _pixels(grids, seed=0):
    """Random processor-shaped patches (Σ t·h·w, 3·2·2·2) for the (t, h, w) grids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 24, generator=generator)


def _prompts(prompts, grids, target=TARGET, end=True, videos=()):
    """Left-padded input_ids and mask: each prompt is a list of word ids, None (an image: <|vision_start|>,
    min(target, G) placeholders and, with ``end``, <|vision_end|>; without it a prompt may end on its image) and "v"
    (a video of ``videos``, the same with video placeholders)."""
    images, clips = iter(grids), iter(videos)
    rows = []
    for prompt in prompts:
        row = []
        for word in prompt:
            if word is None or word == "v":
                t, h, w = next(images) if word is None else next(clips)
                token = IMAGE if word is None else VIDEO
                row += [START] + [token] * min(target, t * h * w // 4) + ([END] if end else [])
            else:
                row.append(word)
        rows.append(row)
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_prefill(model, prompts, grids, oracle, **patch):
    """Patch ``model`` with ``flowcut(model, TARGET, **patch)`` and run the prompts: each image's kept groups are the
    oracle's and the last-position logits within 1e-4 of its float64 ones. ``oracle(model, ids, mask, pixels, grids)``
    (the stock model) gives (logits, kept groups, *more); returns the patched image features and ``more``."""
    ids, mask = _prompts(prompts, grids)
    pixels = _pixels(grids)
    expected, kept, *more = oracle(model, ids, mask, pixels, grids)
    flowcut(model, TARGET, **patch)
    with torch.no_grad():
        features = model.model.get_image_features(pixels, torch.tensor(grids))
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                       image_grid_thw=torch.tensor(grids)).logits
    for got, want in zip(features.keep_groups, kept):
        assert torch.equal(got, want)
    scale = expected.abs().max()
    assert (logits[:, -1].double() - expected).abs().max() <= 1e-4 * scale
    return features, more


CASES = {
    "one image": ([[10, None, 11, 12]], [(1, 8, 12)]),
    "two prompts, sizes differ": ([[10, None, 11, 12], [13, None, 14]], [(1, 8, 12), (1, 12, 6)]),
    "two images in a prompt": ([[10, None, 11, None, 12], [13, None, 14]], [(1, 8, 8), (1, 6, 10), (1, 4, 4)]),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_oracle(case, name):
    prompts, grids = CASES[case]
    oracle = lambda *args: naive_logits(*args, TARGET)
    check_prefill(MODELS[name][0](), prompts, grids, oracle, llm_stage=False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merged_tokens_are_whole_blocks(name):
    grids = [(1, 8, 12), (1, 12, 6)]
    model = flowcut(MODELS[name][0](), TARGET, llm_stage=False)
    with torch.no_grad():
        features = model.model.get_image_features(_pixels(grids), torch.tensor(grids))
    for (t, h, w), groups in zip(grids, features.keep_groups):
        coords = patch_coordinates(t, h, w).long()
        for g in groups.tolist():
            block = coords[4 * g : 4 * g + 4]
            corner = torch.tensor([2 * (g // (w // 2)), 2 * (g % (w // 2))])
            assert {tuple(x) for x in block.tolist()} == {tuple((corner + d).tolist()) for d in
                                                          torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])}
        assert len(groups) == TARGET and bool((groups[1:] > groups[:-1]).all())


def test_window_order_moves_whole_groups():
    """Qwen2.5-VL's tower order: each run of 4 patches is one 2×2 block, each window one contiguous run of the
    groups the oracle puts in it, the images in order."""
    grids = [(1, 8, 12), (1, 12, 6), (1, 4, 4)]
    visual = random_qwen2_5_vl().model.visual
    number, window = windows(visual, torch.tensor(grids))
    first = 0
    for t, h, w in grids:
        count = t * h * w // 4
        mine, theirs = number[first : first + count] - first, window[first : first + count]
        assert sorted(mine.tolist()) == list(range(count)) and bool((theirs[1:] >= theirs[:-1]).all())
        assert group_windows(visual, t, h, w)[mine].unique_consecutive().numel() == theirs.unique().numel()
        coords = patch_coordinates(t, h, w).long().view(-1, 4, 2)[mine]
        assert bool((coords.amax(1) - coords.amin(1) == 1).all()) and bool((coords.amin(1) % 2 == 0).all())
        first += count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unpruned_tower_equals_stock(name):
    grids = torch.tensor([(1, 8, 12), (1, 12, 6)])
    model = MODELS[name][0]()
    pixels = _pixels(grids.tolist())
    with torch.no_grad():
        stock = model.model.get_image_features(pixels, grids).pooler_output
        flowcut(model, 100, llm_stage=False)
        mine = model.model.get_image_features(pixels, grids).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(stock, mine))


def test_small_image_kept_whole():
    grids = [(1, 4, 4)]  # 4 merged tokens <= target
    model = random_qwen2_vl()
    ids, mask = _prompts([[10, None, 11]], grids)
    expected, _ = naive_logits(model, ids, mask, _pixels(grids), grids, TARGET)
    flowcut(model, TARGET, llm_stage=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids),
                       image_grid_thw=torch.tensor(grids))
    assert torch.allclose(logits.logits[:, -1].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite(dtype, name, stage):
    prompts, grids = CASES["two prompts, sizes differ"]
    model = flowcut(MODELS[name][0](dtype=dtype), TARGET, llm_stage=stage)
    ids, mask = _prompts(prompts, grids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids).to(dtype),
                       image_grid_thw=torch.tensor(grids)).logits
    assert torch.isfinite(logits).all()


def _generate(model, prompts, grids, **kwargs):
    ids, mask = _prompts(prompts, grids)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids),
                         image_grid_thw=torch.tensor(grids), max_new_tokens=4, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_batched_equals_single_and_cache_off(name, stage):
    """Batched = each prompt alone; without the stage also = use_cache=False; with it the cache-free run re-prunes
    the whole sequence at every step, so only its first token (the prefill's) must agree."""
    prompts, grids = CASES["two prompts, sizes differ"]
    model = flowcut(MODELS[name][0](), TARGET, llm_stage=stage)
    both = _generate(model, prompts, grids)
    single = []
    for b in range(2):  # each prompt alone, with its own image's pixels
        pixels = _pixels(grids).split([t * h * w for t, h, w in grids])[b]
        ids, mask = _prompts(prompts[b : b + 1], grids[b : b + 1])
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                             image_grid_thw=torch.tensor(grids[b : b + 1]), max_new_tokens=4)
        single.append(out[0, ids.shape[1]:])
    assert torch.equal(both, torch.stack(single))
    uncached = _generate(model, prompts, grids, use_cache=False)
    assert torch.equal(both[:, :1], uncached[:, :1]) if stage else torch.equal(both, uncached)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_remove_flowcut_restores_stock(name):
    grids = CASES["one image"][1]
    build, build_processor = MODELS[name]
    model = build()
    ids_full = torch.tensor([[10, START] + [IMAGE] * 24 + [END, 11]])
    stock_kwargs = dict(input_ids=ids_full, pixel_values=_pixels(grids), image_grid_thw=torch.tensor(grids))
    if "mm_token_type_ids" in inspect.signature(type(model.model).forward).parameters:  # transformers > 5.0
        stock_kwargs["mm_token_type_ids"] = (ids_full == IMAGE).long()
    stock_dict = dict(vars(model.model))
    with torch.no_grad():
        stock = model(**stock_kwargs).logits
    processor = build_processor()
    processor_dict = dict(vars(processor))
    flowcut(model, TARGET, processor=processor if hasattr(type(processor), "replace_image_token") else None)
    with torch.no_grad():
        model(input_ids=_prompts([[10, None, 11]], grids)[0], pixel_values=_pixels(grids),
              image_grid_thw=torch.tensor(grids))
    remove_flowcut(model)
    assert vars(model.model).keys() == stock_dict.keys()
    assert all(vars(model.model)[k] is v for k, v in stock_dict.items() if k != "rope_deltas")
    assert vars(processor).keys() == processor_dict.keys()
    with torch.no_grad():
        again = model(**stock_kwargs).logits
    assert torch.equal(stock, again)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_processor_emits_target_placeholders(name):
    from PIL import Image

    build, build_processor = MODELS[name]
    processor = build_processor()
    if not hasattr(type(processor), "replace_image_token"):
        pytest.skip("this transformers release counts image tokens inside the processor's __call__")
    model = flowcut(build(), TARGET, processor=processor)
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).byte().numpy()) for h, w in
              [(24, 32), (40, 20), (6, 6)]]
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    text = [f"w1 {image} w2", f"w3 {image} {image} w4"]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    counts = [min(TARGET, int(g.prod()) // 4) for g in inputs["image_grid_thw"]]
    assert int((inputs["input_ids"] == IMAGE).sum()) == sum(counts)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
    remove_flowcut(model)
    stock = processor(images=images, text=text, return_tensors="pt", padding=True)["input_ids"]
    assert int((stock == IMAGE).sum()) > sum(counts)


def test_bad_inputs_leave_model_unchanged():
    from tiny.llava import random_llava, tiny_llava_processor

    model = random_qwen2_vl()
    before = dict(vars(model.model))
    llava_processor = tiny_llava_processor(random_llava())
    for kwargs, match in [
        (dict(target_num=0), "target_num"),
        (dict(target_num=4, llm_stage="yes"), "llm_stage"),
        (dict(target_num=4, feature_layer=-2), "feature_layer"),
        (dict(target_num=4, processor=llava_processor), "Qwen2VLProcessor"),
    ]:
        with pytest.raises(FlowCutInputError, match=match):
            flowcut(model, **kwargs)
        assert vars(model.model) == before
    flowcut(model, TARGET)
    assert model.flowcut_config.feature_layer is None  # the merger takes the last layer: nothing to choose
    ids, _ = _prompts([[10, None, 11]], [(1, 8, 8)])
    with pytest.raises(FlowCutInputError, match="spatial_merge_size"):
        model(input_ids=ids, pixel_values=_pixels([(1, 6, 6)])[:45], image_grid_thw=torch.tensor([[1, 5, 9]]))
    with pytest.raises(FlowCutInputError, match="video placeholder"):  # a video without its placeholders
        model(input_ids=ids, pixel_values=_pixels([(1, 8, 8)]), image_grid_thw=torch.tensor([[1, 8, 8]]),
              pixel_values_videos=_pixels([(2, 8, 8)]), video_grid_thw=torch.tensor([[2, 8, 8]]))
    clip, _ = _prompts([[10, "v", 11]], [], videos=[(6, 4, 4)])
    with pytest.raises(FlowCutInputError, match="at least one token of each frame"):
        model(input_ids=clip, pixel_values_videos=_pixels([(6, 4, 4)]), video_grid_thw=torch.tensor([[6, 4, 4]]))
    wrong, _ = _prompts([[10, None, 11]], [(1, 8, 8)], target=16)
    for call in (model, model.generate):  # generate asks for the positions before the images are encoded
        with pytest.raises(FlowCutInputError, match="pass it when patching"):
            call(input_ids=wrong, pixel_values=_pixels([(1, 8, 8)]), image_grid_thw=torch.tensor([[1, 8, 8]]))
    with pytest.raises(FlowCutInputError, match="Qwen2_5_VLProcessor"):
        flowcut(random_qwen2_5_vl(), TARGET, processor=tiny_qwen2_vl_processor())
    with pytest.raises(FlowCutInputError, match="padded on the left"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([ids.shape[1] - 1]), 0),
              pixel_values=_pixels([(1, 8, 8)]), image_grid_thw=torch.tensor([[1, 8, 8]]))


STAGE_CASES = {**CASES, "small image kept whole": ([[10, None, 11, 12], [13, None, 14]], [(1, 8, 12), (1, 4, 4)])}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(STAGE_CASES))
def test_stage_prefill_matches_oracle(case, name):
    """With the language-model stage: the tower keeps min(2K, G₀) groups, decoder layer 1 min(K, W) tokens, each at
    its original M-RoPE position; last-position logits within 1e-4 of the float64 oracle."""
    prompts, grids = STAGE_CASES[case]
    model = MODELS[name][0]()
    check_prefill(model, prompts, grids, lambda *args: naive_stage_logits(*args, TARGET))
    assert model.flowcut_config.llm_stage


#: Videos: (prompts, image grids, video grids); "v" is a video. The grids keep a video's last temporal position below
#: the text after it (⌊(t − 1)·interval⌋ < max(h', w'), Qwen2.5-VL's interval 4 included), where the releases agree.
VIDEO_CASES = {
    "one video": ([[10, "v", 11, 12]], [], [(2, 8, 12)]),
    "an image and videos, two prompts": ([[10, None, 11, "v", 12], [13, "v", 14]], [(1, 8, 8)],
                                         [(2, 8, 12), (2, 4, 10)]),
}


def _video_inputs(prompts, grids, videos):
    ids, mask = _prompts(prompts, grids, videos=videos)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=_pixels(videos, seed=1),
                  video_grid_thw=torch.tensor(videos))
    if grids:
        inputs.update(pixel_values=_pixels(grids), image_grid_thw=torch.tensor(grids))
    return inputs


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(VIDEO_CASES))
def test_video_prefill_matches_oracle(case, name, stage):
    """K = min(target_num, G₀) tokens per video, its frames' shares (K // t, the first K mod t one more), each frame
    pruned as an image (the tower keeping its share of min(2K, G₀) with the stage); kept groups and last-position
    logits as the float64 oracle's (video tokens at (p + ⌊f·interval⌋, p + h, p + w))."""
    prompts, grids, videos = VIDEO_CASES[case]
    model = MODELS[name][0]()
    inputs = _video_inputs(prompts, grids, videos)
    clips = (inputs["pixel_values_videos"], videos, [1.0] * len(videos))
    oracle = naive_stage_logits if stage else naive_logits
    expected, kept, *_ = oracle(model, inputs["input_ids"], inputs["attention_mask"], _pixels(grids), grids, TARGET,
                                videos=clips)
    flowcut(model, TARGET, llm_stage=stage)
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"], torch.tensor(videos))
        logits = model(**inputs).logits
    for (t, h, w), groups, want in zip(videos, features.keep_groups, kept[len(grids):]):
        assert not stage and torch.equal(groups, want)
    for (t, h, w), groups in zip(videos, features.keep_groups):
        total = min((1 + stage) * TARGET, t * h * w // 4)
        assert torch.bincount(groups // (h * w // 4), minlength=t).tolist() == [total // t + (f < total % t)
                                                                                 for f in range(t)]
    assert (logits[:, -1].double() - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_video_bfloat16_finite(name, stage):
    model = flowcut(MODELS[name][0](dtype=torch.bfloat16), TARGET, llm_stage=stage)
    inputs = _video_inputs(*VIDEO_CASES["an image and videos, two prompts"])
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_video_generate_batched_equals_single_and_cache_off(name, stage):
    """An image and two videos in two prompts: batched = each prompt alone; cache off = on (its first token, with
    the stage)."""
    prompts, grids, videos = VIDEO_CASES["an image and videos, two prompts"]
    model = flowcut(MODELS[name][0](), TARGET, llm_stage=stage)
    both = model.generate(**_video_inputs(prompts, grids, videos), max_new_tokens=4)
    length = _prompts(prompts, grids, videos=videos)[0].shape[1]
    clips = _pixels(videos, seed=1).split([t * h * w for t, h, w in videos])
    first = model.generate(**{**_video_inputs(prompts[:1], grids, videos[:1]), "pixel_values_videos": clips[0]},
                           max_new_tokens=4)
    second = model.generate(**{**_video_inputs(prompts[1:], [], videos[1:]), "pixel_values_videos": clips[1]},
                            max_new_tokens=4)
    assert torch.equal(both[0, length:], first[0, -4:]) and torch.equal(both[1, length:], second[0, -4:])
    uncached = model.generate(**_video_inputs(prompts, grids, videos), max_new_tokens=4, use_cache=False)
    assert torch.equal(both[:, :length + 1], uncached[:, :length + 1]) if stage else torch.equal(both, uncached)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_video_processor_hook_writes_frame_shares(name):
    """The patched processor writes min(target_num, G₀) video placeholders per video (the stock text otherwise), and
    refuses a video of more frames than target_num."""
    from types import SimpleNamespace

    processor = MODELS[name][1]()
    if not hasattr(type(processor), "replace_video_token"):
        pytest.skip("this transformers release counts video tokens inside the processor's __call__")
    processor.video_processor = SimpleNamespace(merge_size=2)
    flowcut(MODELS[name][0](), TARGET, processor=processor)
    text = processor.replace_video_token({"video_grid_thw": torch.tensor([[2, 8, 12], [3, 2, 2]])}, 0)
    assert text == "<|video_pad|>" * TARGET
    assert processor.replace_video_token({"video_grid_thw": torch.tensor([[3, 2, 2]])}, 0) == "<|video_pad|>" * 3
    with pytest.raises(FlowCutInputError, match="each frame"):
        processor.replace_video_token({"video_grid_thw": torch.tensor([[6, 2, 2]])}, 0)

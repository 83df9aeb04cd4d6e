"""FlowCut on Qwen3-VL, tower stage alone and with the language-model stage (the default): the float64 oracle with
DeepStack, exactly K tokens per image after the prune, whole 2×2 groups, generation, dtypes, reversibility, bad
inputs."""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from oracle.qwen2_vl import patch_coordinates
from oracle.qwen3_vl import naive_qwen3_logits
import test_qwen2_vl
from test_qwen2_vl import END, IMAGE, START, TARGET, VIDEO, _pixels, _prompts, check_prefill
from tiny.qwen3 import DEEPSTACK, random_qwen3_vl, tiny_qwen3_vl_processor

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut

CASES = {
    "one image": ([[10, None, 11, 12]], [(1, 8, 12)]),
    "two prompts, sizes differ": ([[10, None, 11, 12], [13, None, 14]], [(1, 8, 12), (1, 12, 6)]),
    "two images in a prompt": ([[10, None, 11, None, 12], [13, None, 14]], [(1, 8, 8), (1, 6, 10), (1, 4, 4)]),
    "small image kept whole": ([[10, None, 11, 12], [13, None, 14]], [(1, 8, 12), (1, 4, 4)]),
}


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_oracle(case, stage):
    """Last-position logits within 1e-4 of the float64 oracle (DeepStack included), the tower's kept groups and each
    kept token's DeepStack features exactly the oracle's."""
    prompts, grids = CASES[case]
    oracle = lambda *args: naive_qwen3_logits(*args, TARGET, stage)
    features, (stacks,) = check_prefill(random_qwen3_vl(), prompts, grids, oracle, llm_stage=stage)
    assert len(features.deepstack_features) == len(DEEPSTACK)
    for layer, per_image in enumerate(features.deepstack_features):
        for got, want in zip(per_image, stacks):
            assert torch.allclose(got.double(), want[layer], rtol=1e-4, atol=1e-5)


def test_deepstack_reaches_kept_tokens():
    """Without its DeepStack features the prefill differs from the oracle: the test above sees them."""
    prompts, grids = CASES["one image"]
    model = random_qwen3_vl()
    ids, mask = _prompts(prompts, grids)
    expected, _, _ = naive_qwen3_logits(model, ids, mask, _pixels(grids), grids, TARGET, False)
    flowcut(model, TARGET, llm_stage=False)
    model.model.language_model.config.output_hidden_states = False
    with torch.no_grad():
        features = model.model.get_image_features(_pixels(grids), torch.tensor(grids))
        features.deepstack_features = tuple(tuple(torch.zeros_like(f) for f in layer)
                                            for layer in features.deepstack_features)
        logits = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": features}).logits \
            if "mm_encoder_outputs" in inspect.signature(type(model.model).forward).parameters else None
    if logits is None:
        pytest.skip("this transformers release takes no pre-encoded image features")
    assert (logits[:, -1].double() - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("stage", [False, True])
def test_exactly_k_tokens_after_the_prune(stage):
    """The decoder layers after the prune see each prompt's text and exactly K tokens per image."""
    prompts, grids = CASES["two images in a prompt"]
    model = flowcut(random_qwen3_vl(), TARGET, llm_stage=stage)
    ids, mask = _prompts(prompts, grids)
    seen = []
    layers = model.model.language_model.layers
    handle = layers[2].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids), image_grid_thw=torch.tensor(grids))
    handle.remove()
    counts = [min(TARGET, t * h * w // 4) for t, h, w in grids]
    assert int((ids == IMAGE).sum()) == sum(counts) and seen == [ids.shape[1]]


def test_merged_tokens_are_whole_blocks():
    grids = [(1, 8, 12), (1, 12, 6)]
    model = flowcut(random_qwen3_vl(), TARGET, llm_stage=False)
    with torch.no_grad():
        features = model.model.get_image_features(_pixels(grids), torch.tensor(grids))
    for (t, h, w), groups in zip(grids, features.keep_groups):
        coords = patch_coordinates(t, h, w).long()
        for g in groups.tolist():
            block = {tuple(x) for x in coords[4 * g : 4 * g + 4].tolist()}
            corner = (2 * (g // (w // 2)), 2 * (g % (w // 2)))
            assert block == {(corner[0] + dy, corner[1] + dx) for dy in (0, 1) for dx in (0, 1)}
        assert len(groups) == TARGET and bool((groups[1:] > groups[:-1]).all())


def test_unpruned_tower_equals_stock():
    """With every group kept the patched features (merged tokens and DeepStack) are the stock tower's exactly."""
    grids = torch.tensor([(1, 8, 12), (1, 12, 6)])
    model = random_qwen3_vl()
    pixels = _pixels(grids.tolist())
    with torch.no_grad():
        stock = model.model.get_image_features(pixels, grids)
        flowcut(model, 100, llm_stage=False)
        mine = model.model.get_image_features(pixels, grids)
    assert torch.equal(torch.cat(stock.pooler_output), torch.cat(mine.pooler_output))
    for theirs, ours in zip(stock.deepstack_features, mine.deepstack_features):
        theirs = theirs if isinstance(theirs, torch.Tensor) else torch.cat(theirs)  # 5.0: one tensor per layer
        assert torch.equal(theirs, torch.cat(ours))


@pytest.mark.parametrize("stage", [True, False])
def test_bfloat16_finite(stage):
    prompts, grids = CASES["two prompts, sizes differ"]
    model = flowcut(random_qwen3_vl(dtype=torch.bfloat16), TARGET, llm_stage=stage)
    ids, mask = _prompts(prompts, grids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids).bfloat16(),
                       image_grid_thw=torch.tensor(grids)).logits
    assert torch.isfinite(logits).all()


@pytest.fixture
def as_qwen2_case(monkeypatch):
    """test_qwen2_vl's model-parametrised checks, run on the tiny Qwen3-VL under the name "qwen3_vl"."""
    monkeypatch.setitem(test_qwen2_vl.MODELS, "qwen3_vl", (random_qwen3_vl, tiny_qwen3_vl_processor))


@pytest.mark.parametrize("stage", [True, False])
def test_generate_batched_equals_single_and_cache_off(as_qwen2_case, stage):
    """Greedy batched (left-padded, different sizes) = each prompt alone; cache on = off (with the stage: the first
    token)."""
    test_qwen2_vl.test_generate_batched_equals_single_and_cache_off("qwen3_vl", stage)


def test_remove_flowcut_restores_stock(as_qwen2_case):
    test_qwen2_vl.test_remove_flowcut_restores_stock("qwen3_vl")


def test_processor_emits_target_placeholders(as_qwen2_case):
    """The Qwen3VLProcessor writes min(K, G₀) placeholders per image, refuses videos, counts as stock after
    remove_flowcut."""
    test_qwen2_vl.test_processor_emits_target_placeholders("qwen3_vl")


def test_bad_inputs_leave_model_unchanged():
    from tiny.qwen import tiny_qwen2_vl_processor

    model = random_qwen3_vl()
    before = dict(vars(model.model))
    for kwargs, match in [
        (dict(target_num=0), "target_num"),
        (dict(target_num=4, llm_stage="yes"), "llm_stage"),
        (dict(target_num=4, feature_layer=-2), "feature_layer"),
        (dict(target_num=4, processor=tiny_qwen2_vl_processor()), "Qwen3VLProcessor"),
    ]:
        with pytest.raises(FlowCutInputError, match=match):
            flowcut(model, **kwargs)
        assert vars(model.model) == before
    flowcut(model, TARGET)
    ids, _ = _prompts([[10, None, 11]], [(1, 8, 8)])
    with pytest.raises(FlowCutInputError, match="spatial_merge_size"):
        model(input_ids=ids, pixel_values=_pixels([(1, 6, 6)])[:45], image_grid_thw=torch.tensor([[1, 5, 9]]))
    with pytest.raises(FlowCutInputError, match="t > 1 frames"):  # the tower would attend across its frames
        model(input_ids=ids, pixel_values=_pixels([(2, 8, 8)]), image_grid_thw=torch.tensor([[2, 8, 8]]))
    wrong, _ = _prompts([[10, None, 11]], [(1, 8, 8)], target=16)
    with pytest.raises(FlowCutInputError, match="pass it when patching"):
        model(input_ids=wrong, pixel_values=_pixels([(1, 8, 8)]), image_grid_thw=torch.tensor([[1, 8, 8]]))


@pytest.mark.parametrize("stage", [True, False])
def test_moe_generates_batched_as_single(monkeypatch, stage):
    """Qwen3-VL-MoE (the same tower, an expert language model): with every group kept its tower is the stock one,
    and greedy batched = single, cache on = off, as for the dense model."""
    grids = torch.tensor([(1, 8, 12), (1, 12, 6)])
    model = random_qwen3_vl(moe=True)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    with torch.no_grad():
        stock = model.model.get_image_features(_pixels(grids.tolist()), grids)
        flowcut(model, 100, llm_stage=False)
        mine = model.model.get_image_features(_pixels(grids.tolist()), grids)
    assert torch.equal(torch.cat(stock.pooler_output), torch.cat(mine.pooler_output))
    remove_flowcut(model)
    monkeypatch.setitem(test_qwen2_vl.MODELS, "qwen3_vl_moe", (lambda **kw: random_qwen3_vl(moe=True, **kw), None))
    test_qwen2_vl.test_generate_batched_equals_single_and_cache_off("qwen3_vl_moe", stage)


def _frames_prompt(words, video, target=TARGET):
    """A Qwen3-VL video prompt as its processor writes it: per frame a timestamp (word 20 + f), <|vision_start|>, the
    frame's share of min(target, G₀) video placeholders, <|vision_end|>; ``words`` around it (None: the video)."""
    t, h, w = video
    total = min(target, t * h * w // 4)
    row = []
    for word in words:
        if word is None:
            for f in range(t):
                row += [20 + f, START] + [VIDEO] * (total // t + (f < total % t)) + [END]
        else:
            row.append(word)
    return row


def _left_padded(rows):
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])


#: An image prompt and a video prompt (3 frames, each its own timestamped run): image grids, video grids, rows.
VIDEO_BATCH = ([(1, 8, 12)], [(3, 8, 8)], lambda: [_prompts([[10, None, 11, 12]], [(1, 8, 12)])[0][0].tolist(),
                                                  _frames_prompt([13, None, 14], (3, 8, 8))])


@pytest.mark.parametrize("stage", [False, True])
def test_video_prefill_matches_oracle(stage):
    """An image prompt and a video prompt (3 frames, each its own timestamped run) in one left-padded batch: the
    frames' kept groups, DeepStack included, and last-position logits as the float64 oracle's."""
    grids, videos, rows = VIDEO_BATCH
    ids, mask = _left_padded(rows())
    pixels, clips = _pixels(grids), _pixels(videos, seed=1)
    model = random_qwen3_vl()
    expected, kept, _ = naive_qwen3_logits(model, ids, mask, pixels, grids, TARGET, stage, videos=(clips, videos))
    flowcut(model, TARGET, llm_stage=stage)
    with torch.no_grad():
        features = model.model.get_video_features(clips, torch.tensor(videos))
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                       pixel_values_videos=clips, video_grid_thw=torch.tensor(videos)).logits
    frames = torch.cat([groups + f * 16 for f, groups in enumerate(kept[1:])])
    assert torch.equal(features.keep_groups[0], frames)
    assert (logits[:, -1].double() - expected).abs().max() <= 1e-4 * expected.abs().max()


def _video_generate(model, rows, grids, videos, pixels, clips, **kwargs):
    ids, mask = _left_padded(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=clips, video_grid_thw=torch.tensor(videos))
    if grids:
        inputs.update(pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    return model.generate(**inputs, max_new_tokens=4, **kwargs)[:, ids.shape[1]:]


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("build", ["qwen3_vl", "qwen3_5"])
def test_video_generate_batched_equals_single_and_cache_off(build, stage):
    """Greedy batched = each prompt alone; cache off = on (its first token, with the stage); exactly K video tokens
    reach the decoder layers after the prune."""
    if build == "qwen3_5":
        from flowcut_kernels.models import seams
        from tiny.qwen3 import random_qwen3_5

        if not seams.qwen3_5_classes() or stage:
            pytest.skip("Qwen3.5: on releases that have it, tower stage only")
        model = random_qwen3_5()
    else:
        model = random_qwen3_vl()
    flowcut(model, TARGET, llm_stage=stage)
    grids, videos, rows = VIDEO_BATCH
    pixels, clips = _pixels(grids), _pixels(videos, seed=1)
    seen = []
    handle = model.model.language_model.layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    both = _video_generate(model, rows(), grids, videos, pixels, clips)
    handle.remove()
    assert seen[0] == _left_padded(rows())[0].shape[1] and int((_left_padded(rows())[0] == VIDEO).sum()) == TARGET
    ids, mask = _left_padded(rows()[:1])
    image = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                           max_new_tokens=4)[:, ids.shape[1]:]
    video = _video_generate(model, rows()[1:], [], videos, None, clips)
    assert torch.equal(both[0], image[0]) and torch.equal(both[1], video[0])
    uncached = _video_generate(model, rows(), grids, videos, pixels, clips, use_cache=False)
    assert torch.equal(both[:, :1], uncached[:, :1]) if stage else torch.equal(both, uncached)

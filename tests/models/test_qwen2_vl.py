"""FlowCut on Qwen2-VL (tower stage): the float64 oracle, batches, generation, dtypes, reversibility, bad inputs."""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from oracle.qwen2_vl import naive_logits, patch_coordinates

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut
from flowcut_kernels.models.synthetic import QWEN_WORDS, random_qwen2_vl, tiny_qwen2_vl_processor

IMAGE, START, END = (QWEN_WORDS.index(w) for w in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
TARGET = 5


def _pixels(grids, seed=0):
    """Random processor-shaped patches (Σ t·h·w, 3·2·2·2) for the (t, h, w) grids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 24, generator=generator)


def _prompts(prompts, grids, target=TARGET):
    """Left-padded input_ids and mask: each prompt is a list of word ids and None (an image: min(target, G) tokens)."""
    images = iter(grids)
    rows = []
    for prompt in prompts:
        row = []
        for word in prompt:
            if word is None:
                t, h, w = next(images)
                row += [START] + [IMAGE] * min(target, t * h * w // 4) + [END]
            else:
                row.append(word)
        rows.append(row)
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


CASES = {
    "one image": ([[10, None, 11, 12]], [(1, 8, 12)]),
    "two prompts, sizes differ": ([[10, None, 11, 12], [13, None, 14]], [(1, 8, 12), (1, 12, 6)]),
    "two images in a prompt": ([[10, None, 11, None, 12], [13, None, 14]], [(1, 8, 8), (1, 6, 10), (1, 4, 4)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_oracle(case):
    prompts, grids = CASES[case]
    model = random_qwen2_vl()
    ids, mask = _prompts(prompts, grids)
    pixels = _pixels(grids)
    expected, kept = naive_logits(model, ids, mask, pixels, grids, TARGET)
    flowcut(model, TARGET)
    with torch.no_grad():
        features = model.model.get_image_features(pixels, torch.tensor(grids))
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                       image_grid_thw=torch.tensor(grids)).logits
    for got, want in zip(features.keep_groups, kept):
        assert torch.equal(got, want)
    scale = expected.abs().max()
    assert (logits[:, -1].double() - expected).abs().max() <= 1e-4 * scale


def test_merged_tokens_are_whole_blocks():
    grids = [(1, 8, 12), (1, 12, 6)]
    model = flowcut(random_qwen2_vl(), TARGET)
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


def test_small_image_kept_whole():
    grids = [(1, 4, 4)]  # 4 merged tokens <= target
    model = random_qwen2_vl()
    ids, mask = _prompts([[10, None, 11]], grids)
    expected, _ = naive_logits(model, ids, mask, _pixels(grids), grids, TARGET)
    flowcut(model, TARGET)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids),
                       image_grid_thw=torch.tensor(grids))
    assert torch.allclose(logits.logits[:, -1].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite(dtype):
    prompts, grids = CASES["two prompts, sizes differ"]
    model = flowcut(random_qwen2_vl(dtype=dtype), TARGET)
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


def test_generate_batched_equals_single_and_cache_off():
    prompts, grids = CASES["two prompts, sizes differ"]
    model = flowcut(random_qwen2_vl(), TARGET)
    both = _generate(model, prompts, grids)
    single = []
    for b in range(2):  # each prompt alone, with its own image's pixels
        pixels = _pixels(grids).split([t * h * w for t, h, w in grids])[b]
        ids, mask = _prompts(prompts[b : b + 1], grids[b : b + 1])
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                             image_grid_thw=torch.tensor(grids[b : b + 1]), max_new_tokens=4)
        single.append(out[0, ids.shape[1]:])
    assert torch.equal(both, torch.stack(single))
    assert torch.equal(both, _generate(model, prompts, grids, use_cache=False))


def test_remove_flowcut_restores_stock():
    grids = CASES["one image"][1]
    model = random_qwen2_vl()
    ids_full = torch.tensor([[10, START] + [IMAGE] * 24 + [END, 11]])
    stock_kwargs = dict(input_ids=ids_full, pixel_values=_pixels(grids), image_grid_thw=torch.tensor(grids))
    if "mm_token_type_ids" in inspect.signature(type(model.model).forward).parameters:  # transformers > 5.0
        stock_kwargs["mm_token_type_ids"] = (ids_full == IMAGE).long()
    stock_dict = dict(vars(model.model))
    with torch.no_grad():
        stock = model(**stock_kwargs).logits
    processor = tiny_qwen2_vl_processor()
    processor_dict = dict(vars(processor))
    flowcut(model, TARGET, processor=processor if hasattr(type(processor), "replace_image_token") else None)
    remove_flowcut(model)
    assert vars(model.model).keys() == stock_dict.keys()
    assert all(vars(model.model)[k] is v for k, v in stock_dict.items() if k != "rope_deltas")
    assert vars(processor).keys() == processor_dict.keys()
    with torch.no_grad():
        again = model(**stock_kwargs).logits
    assert torch.equal(stock, again)


def test_processor_emits_target_placeholders():
    from PIL import Image

    processor = tiny_qwen2_vl_processor()
    if not hasattr(type(processor), "replace_image_token"):
        pytest.skip("this transformers release counts image tokens inside Qwen2VLProcessor.__call__")
    model = flowcut(random_qwen2_vl(), TARGET, processor=processor)
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
    with pytest.raises(FlowCutInputError, match="videos"):
        processor.replace_video_token({}, 0)
    remove_flowcut(model)
    stock = processor(images=images, text=text, return_tensors="pt", padding=True)["input_ids"]
    assert int((stock == IMAGE).sum()) > sum(counts)


def test_bad_inputs_leave_model_unchanged():
    from flowcut_kernels.models.synthetic import random_llava, tiny_llava_processor

    model = random_qwen2_vl()
    before = dict(vars(model.model))
    llava_processor = tiny_llava_processor(random_llava())
    for kwargs, match in [
        (dict(target_num=0), "target_num"),
        (dict(target_num=4, llm_stage=True), "llm_stage"),
        (dict(target_num=4, feature_layer=-2), "feature_layer"),
        (dict(target_num=4, processor=llava_processor), "Qwen2VLProcessor"),
    ]:
        with pytest.raises(FlowCutInputError, match=match):
            flowcut(model, **kwargs)
        assert vars(model.model) == before
    flowcut(model, TARGET)
    ids, _ = _prompts([[10, None, 11]], [(1, 8, 8)])
    with pytest.raises(FlowCutInputError, match="spatial_merge_size"):
        model(input_ids=ids, pixel_values=_pixels([(1, 6, 6)])[:45], image_grid_thw=torch.tensor([[1, 5, 9]]))
    with pytest.raises(FlowCutInputError, match="videos"):
        model(input_ids=ids, pixel_values_videos=_pixels([(2, 8, 8)]), video_grid_thw=torch.tensor([[2, 8, 8]]))
    wrong, _ = _prompts([[10, None, 11]], [(1, 8, 8)], target=16)
    with pytest.raises(FlowCutInputError, match="processor"):
        model(input_ids=wrong, pixel_values=_pixels([(1, 8, 8)]), image_grid_thw=torch.tensor([[1, 8, 8]]))

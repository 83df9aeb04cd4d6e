"""FlowCut in vLLM's engine on tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints: K placeholders per image, the
served tower's kept groups and tokens (Qwen3-VL: and DeepStack features) equal the transformers patch's, the first
greedy token equals the patched HF model's, a batch of images of different sizes equals each alone, stock without
the key, bad configs and architectures the plug-in does not serve fail at load."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from runner import run_engine
from tiny.vllm_qwen import IMAGE, image, prompt, save_tiny_qwen

TARGET = 6
#: (width, height, seed): 24, 24 and 64 merge groups (the last the processor's largest; Qwen3-VL's 16-pixel patches:
#: 20, 20 and 49)
IMAGES = [[112, 168, 0], [168, 112, 1], [224, 224, 2]]


ARCHS = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
         "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=list(ARCHS))
def served(request, tmp_path_factory):
    """(arch, folder, the engine's result with FlowCut)."""
    folder = save_tiny_qwen(str(tmp_path_factory.mktemp(request.param)), request.param)
    code, output, result = run_engine(folder, {"flowcut": {"target_num": TARGET}}, IMAGES)
    assert code == 0 and result is not None, output[-4000:]
    return request.param, folder, result


def _hf(arch: str, folder: str):
    import transformers

    from flowcut_kernels import flowcut

    model = getattr(transformers, ARCHS[arch]).from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    flowcut(model, TARGET, processor=processor, llm_stage=False)
    return model, processor


def test_k_placeholders_per_image_as_the_hf_patch_writes(served):
    arch, folder, result = served
    _, processor = _hf(arch, folder)
    for i, (width, height, seed) in enumerate(IMAGES):
        inputs = processor(text=[prompt(f"w{1 + i}")], images=[image(width, height, seed)], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids == result["prompt_ids"][i]
        assert ids.count(IMAGE) == TARGET


def test_tower_keeping_every_group_equals_vllms_tower(served):
    _, _, result = served
    assert result["unpruned_error"] < 1e-5


def test_tower_and_first_token_match_the_hf_patch(served):
    arch, folder, result = served
    model, processor = _hf(arch, folder)
    merge = model.config.vision_config.spatial_merge_size
    for i, (width, height, seed) in enumerate(IMAGES):
        inputs = processor(text=[prompt(f"w{1 + i}")], images=[image(width, height, seed)], return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            first = int(model(**inputs).logits[0, -1].argmax())
        served_tower = torch.tensor(result["tower"][i])
        _, h, w = (x // merge for x in inputs["image_grid_thw"][0].tolist())
        kept = features.keep_groups[0]
        offsets = torch.stack([kept // (h * w), kept // w % h, kept % w], dim=1)
        assert served_tower[:, -3:].round().long().tolist() == offsets.tolist(), "kept groups differ"
        assert len(kept) == TARGET
        tokens = [features.pooler_output[0]] + [layer[0] for layer in features.deepstack_features or ()]
        torch.testing.assert_close(served_tower[:, :-3], torch.cat(tokens, dim=1), rtol=1e-4, atol=1e-4)
        assert result["alone"][i][0] == first


def test_batch_of_different_sizes_equals_each_alone(served):
    _, _, result = served
    assert result["batch"] == result["alone"]


def test_without_the_key_outputs_equal_stock_vllm(tmp_path):
    folder = save_tiny_qwen(str(tmp_path / "qwen2_vl"), "qwen2_vl")
    code, output, plugged = run_engine(folder, None, IMAGES[:2])
    assert code == 0, output[-4000:]
    code, output, stock = run_engine(folder, None, IMAGES[:2], plugins=False)
    assert code == 0, output[-4000:]
    assert plugged == stock
    assert plugged["prompt_ids"][0].count(IMAGE) == 24  # the stock count: every merge group


@pytest.mark.parametrize("target", [0, 65])
def test_bad_target_num_fails_at_load_naming_the_key(tmp_path, target):
    folder = save_tiny_qwen(str(tmp_path / "qwen2_vl"), "qwen2_vl")
    code, output, result = run_engine(folder, {"flowcut": {"target_num": target}}, IMAGES[:1], timeout=200)
    assert code != 0 and result is None
    assert f"flowcut.target_num={target}" in output


def test_an_architecture_not_served_fails_at_load_naming_it(tmp_path):
    from tiny.llava_next import random_llava_next, tiny_llava_next_processor

    folder = str(tmp_path / "llava_next")
    model = random_llava_next()
    model.save_pretrained(folder)
    tiny_llava_next_processor(model).save_pretrained(folder)
    code, output, result = run_engine(folder, {"flowcut": {"target_num": TARGET}}, IMAGES[:1], timeout=200)
    assert code != 0 and result is None
    assert "architecture LlavaNextForConditionalGeneration is not one of them" in output, output[-4000:]

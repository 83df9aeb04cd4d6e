"""FlowCut in vLLM's engine on a tiny LLaVA-1.5 checkpoint (CLIP tower): K placeholders per image, the served tower's
kept patches and tokens equal the transformers patch's, the first greedy token equals the patched HF model's, a batch
equals each image alone, stock without the key, bad target_num values and configurations the plug-in does not prune
fail at load."""

import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from runner import run_engine
from tiny.text import IMAGE_TOKEN
from tiny.vllm_llava import prompt, save_tiny_llava
from tiny.vllm_qwen import image

TARGET = 6
#: (width, height, seed): the processor resizes and crops each to the tower's 112² (64 patches).
IMAGES = [[112, 168, 0], [168, 112, 1], [224, 224, 2]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llava(str(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def served(folder):
    """The engine's result with FlowCut."""
    code, output, result = run_engine(folder, {"flowcut": {"target_num": TARGET}}, IMAGES)
    assert code == 0 and result is not None, output[-4000:]
    return result


def _hf(folder: str):
    import transformers

    from flowcut_kernels import flowcut

    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    flowcut(model, TARGET, processor=processor, llm_stage=False)
    return model, processor


def test_k_placeholders_per_image_as_the_hf_patch_writes(folder, served):
    _, processor = _hf(folder)
    for i, (width, height, seed) in enumerate(IMAGES):
        inputs = processor(text=[prompt(f"w{1 + i}")], images=[image(width, height, seed)], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert ids == served["prompt_ids"][i]
        assert ids.count(IMAGE_TOKEN) == TARGET


def test_tower_keeping_every_patch_equals_vllms_tower(served):
    assert served["unpruned_error"] < 1e-5


def test_tower_and_first_token_match_the_hf_patch(folder, served):
    model, processor = _hf(folder)
    for i, (width, height, seed) in enumerate(IMAGES):
        inputs = processor(text=[prompt(f"w{1 + i}")], images=[image(width, height, seed)], return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
            first = int(model(**inputs).logits[0, -1].argmax())
        tower = torch.tensor(served["tower"][i])  # (K, C_text + 1): projected tokens, kept patch
        assert tower[:, -1].long().tolist() == features.keep_indices[0].tolist(), "kept patches differ"
        torch.testing.assert_close(tower[:, :-1], features.pooler_output[0], rtol=1e-4, atol=1e-4)
        assert served["alone"][i][0] == first


def test_batch_equals_each_alone(served):
    assert served["batch"] == served["alone"]


def test_without_the_key_outputs_equal_stock_vllm(folder):
    code, output, plugged = run_engine(folder, None, IMAGES[:2])
    assert code == 0, output[-4000:]
    code, output, stock = run_engine(folder, None, IMAGES[:2], plugins=False)
    assert code == 0, output[-4000:]
    assert plugged == stock
    assert plugged["prompt_ids"][0].count(IMAGE_TOKEN) == 64  # the stock count: every patch


@pytest.mark.parametrize("target", [0, 65])
def test_bad_target_num_fails_at_load_naming_the_key(folder, target):
    code, output, result = run_engine(folder, {"flowcut": {"target_num": target}}, IMAGES[:1], timeout=200)
    assert code != 0 and result is None
    assert f"flowcut.target_num={target}" in output


@pytest.mark.parametrize("change,message", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'default'"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer=[-2, -1] selects several feature layers"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "this model's tower is SiglipVisionConfig"),
], ids=["strategy", "feature-layers", "siglip-tower"])
def test_unsupported_configurations_fail_at_load_naming_them(folder, tmp_path, change, message):
    """A configuration stock vLLM serves but the plug-in does not prune fails at load with the key, not silently
    (``change``: config.json's fields replaced, a dict's own fields one by one)."""
    edited = shutil.copytree(folder, tmp_path / "edited")
    with open(edited / "config.json") as f:
        config = json.load(f)
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with open(edited / "config.json", "w") as f:
        json.dump(config, f)
    code, output, result = run_engine(str(edited), {"flowcut": {"target_num": TARGET}}, IMAGES[:1], timeout=200)
    assert code != 0 and result is None
    assert message in output

"""Run vLLM's engine on a tiny checkpoint in its own process and print one JSON line (tests/vllm/test_qwen.py).

    python engine.py FOLDER '{"flowcut": {"target_num": 6}}' IMAGES

IMAGES: a JSON list of [width, height, seed]. Greedy 4-token outputs for each image alone, then for all in one batch;
with FlowCut, also each image's tower output (pruned, merged; Qwen3-VL: with its DeepStack features) and kept groups
(LLaVA: projected tokens and kept patches) from the served model itself, fed the patches as vLLM's processor makes
them.
"""

import json
import os
import sys

for key, value in dict(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                       OMP_NUM_THREADS="2", VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(key, value)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tiny import vllm_llava, vllm_qwen  # noqa: E402
from tiny.vllm_qwen import image  # noqa: E402


def main():
    import torch
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    folder, overrides, shapes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    with open(os.path.join(folder, "config.json")) as config:
        llava = json.load(config)["model_type"] == "llava"
    prompt = (vllm_llava if llava else vllm_qwen).prompt
    llm = LLM(model=folder, enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=1024, limit_mm_per_prompt={"image": 1}, seed=0, hf_overrides=overrides or None)
    images = [image(*shape) for shape in shapes]
    requests = [{"prompt": prompt(f"w{1 + i}"), "multi_modal_data": {"image": img}} for i, img in enumerate(images)]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    alone = [llm.generate([r], greedy, use_tqdm=False)[0] for r in requests]
    batch = llm.generate(requests, greedy, use_tqdm=False)
    result = {
        "prompt_ids": [o.prompt_token_ids for o in alone],
        "alone": [list(o.outputs[0].token_ids) for o in alone],
        "batch": [list(o.outputs[0].token_ids) for o in batch],
    }
    if overrides:
        processor = AutoProcessor.from_pretrained(folder)
        normalised = processor.image_processor(images=images, return_tensors="pt")
        raw = processor.image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
        grid = normalised.get("image_grid_thw")  # Qwen; LLaVA: None

        def pixels(model):
            """The patches as vLLM's processor hands them to the tower: raw where the tower normalises them."""
            from vllm.model_executor.layers.fusion.mm_input_norm import IdentityInputNorm

            return (normalised if isinstance(model.visual.input_norm, IdentityInputNorm) else raw)["pixel_values"]

        def tower(model):
            out = model._process_image_input({"type": "pixel_values", "pixel_values": pixels(model),
                                              "image_grid_thw": grid})
            return [x.tolist() for x in out]

        def unpruned(model):  # FlowCut's tower keeping every group against vLLM's own tower
            from flowcut_kernels.vllm.tower import pruned_tower

            hidden, _, deepstack = pruned_tower(model.visual, pixels(model), grid, (grid.prod(-1) // 4).tolist(),
                                                "auto")
            stock = model.visual(pixels(model), grid_thw=grid)
            return float((torch.cat([model.visual.merger(hidden), *deepstack], dim=1) - stock).abs().max())

        if llava:
            tower, unpruned = _llava_checks(normalised["pixel_values"], overrides["flowcut"]["target_num"])
        result["tower"] = llm.apply_model(tower)[0]
        result["unpruned_error"] = llm.apply_model(unpruned)[0]
    print("RESULT " + json.dumps(result), flush=True)


def _llava_checks(pixels, target: int):
    """LLaVA's (tower, unpruned) checks: the served tower's projected tokens and kept patches per image; FlowCut's
    tower keeping every patch against vLLM's own tower."""
    import torch

    from flowcut_kernels.vllm.llava import pruned_clip

    def tower(model):
        features = model._process_image_input({"type": "pixel_values", "pixel_values": pixels})
        _, keep = pruned_clip(model.vision_tower, pixels, target, model._flowcut_feature, "auto")
        return [torch.cat([f, k[:, None].to(f.dtype)], dim=1).tolist() for f, k in zip(features, keep)]

    def unpruned(model):
        patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
        hidden, keep = pruned_clip(model.vision_tower, pixels, patches**2, model._flowcut_feature, "auto")
        stock = model.vision_tower(pixels, feature_select_strategy="default")
        assert keep.tolist() == [list(range(patches**2))] * len(pixels)
        return float((hidden - stock).abs().max())

    return tower, unpruned


if __name__ == "__main__":
    main()

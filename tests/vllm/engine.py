"""Run vLLM's engine on a tiny checkpoint in its own process and print one JSON line (tests/vllm/test_qwen.py).

    python engine.py FOLDER '{"flowcut": {"target_num": 6}}' IMAGES

IMAGES: a JSON list of [width, height, seed]. Greedy 4-token outputs for each image alone, then for all in one batch;
with FlowCut, also each image's tower output (pruned, merged) and kept groups from the served model itself.
"""

import json
import os
import sys

for key, value in dict(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                       OMP_NUM_THREADS="2", VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(key, value)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tiny.vllm_qwen import image, prompt  # noqa: E402


def main():
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    folder, overrides, shapes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
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
        inputs = processor.image_processor(images=images, return_tensors="pt")

        def tower(model):
            out = model._process_image_input({"type": "pixel_values", "pixel_values": inputs["pixel_values"],
                                              "image_grid_thw": inputs["image_grid_thw"]})
            return [x.tolist() for x in out]

        def unpruned(model):  # FlowCut's tower keeping every group against vLLM's own tower
            from flowcut_kernels.vllm.tower import pruned_tower

            grid = inputs["image_grid_thw"]
            hidden, _ = pruned_tower(model.visual, inputs["pixel_values"], grid, (grid.prod(-1) // 4).tolist(), "auto")
            stock = model.visual(inputs["pixel_values"], grid_thw=grid)
            return float((model.visual.merger(hidden) - stock).abs().max())

        result["tower"] = llm.apply_model(tower)[0]
        result["unpruned_error"] = llm.apply_model(unpruned)[0]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

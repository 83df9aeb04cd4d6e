"""Time vLLM's CPU engine with and without FlowCut on a random Qwen2-VL of real-shaped tower (docs/vllm.md).

    python benchmarks/vllm_cpu.py OUT.json [--depth 32] [--size 448] [--target 64] [--requests 8]

Builds a random float32 Qwen2-VL checkpoint (vision: Qwen2-VL-2B's width 1280, 16 heads, 14-pixel patches, 2×2 merge,
``--depth`` blocks, q/k ×8 as the bench's Qwen presets; text: 2 layers of width 256, enough to time the tower and
the prefill) in a temporary folder,
then for stock and FlowCut-``--target``: time to first token of 1 request (max_tokens=1), and requests/s of 1 and
of ``--requests`` concurrent requests (distinct random ``--size``² images, 16 new tokens each). Each engine runs in its
own process (needs the vLLM environment of .ci/vllm).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

for key, value in dict(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="nobind",
                       VLLM_ENABLE_V1_MULTIPROCESSING="0").items():
    os.environ.setdefault(key, value)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build(folder: str, depth: int) -> None:
    import torch
    import transformers
    from tiny.text import tiny_qwen_tokenizer
    from tiny.vllm_qwen import MIN_PIXELS, _text

    from flowcut_kernels.bench.random_models import sharpen_qwen_attention
    from flowcut_kernels.bench.scenarios import QWEN_SHARPEN as SHARPEN

    torch.manual_seed(0)
    text = _text()
    text["text_config"].update(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=4096)
    vision = dict(depth=depth, embed_dim=1280, hidden_size=256, num_heads=16, mlp_ratio=4, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    model = transformers.Qwen2VLForConditionalGeneration._from_config(
        transformers.Qwen2VLConfig(vision_config=vision, **text), dtype=torch.float32)
    sharpen_qwen_attention(model.model.visual, SHARPEN)  # as the bench's Qwen presets: pruning as on real weights
    model.save_pretrained(folder)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": 448 * 448}
    transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(patch_size=14, merge_size=2, size=size),
        tokenizer=tiny_qwen_tokenizer(), video_processor=transformers.Qwen2VLVideoProcessor(size=size),
    ).save_pretrained(folder)


def engine(folder: str, target: int | None, size: int, requests: int) -> dict:
    from tiny.vllm_qwen import image, prompt
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, enforce_eager=True, dtype="float32", max_model_len=2048, max_num_seqs=requests,
              max_num_batched_tokens=8192, limit_mm_per_prompt={"image": 1}, seed=0,
              hf_overrides={"flowcut": {"target_num": target}} if target else None)
    asks = [{"prompt": prompt(), "multi_modal_data": {"image": image(size, size, seed)}}
            for seed in range(requests + 2)]
    llm.generate(asks[-1:], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(asks[-2:-1], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    result = {"ttft_s": time.perf_counter() - start, "prompt_tokens": len(outs[0].prompt_token_ids)}
    for n in sorted({1, requests}):
        start = time.perf_counter()
        llm.generate(asks[:n], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
        result[f"requests_per_s_at_{n}"] = n / (time.perf_counter() - start)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--engine", nargs=2, help=argparse.SUPPRESS)  # internal: folder, target (0 = stock)
    args = parser.parse_args()
    if args.engine:
        folder, target = args.engine[0], int(args.engine[1])
        result = engine(folder, target or None, args.size, args.requests)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {"depth": args.depth, "size": args.size, "target": args.target, "cpu_threads": os.cpu_count()}
    with tempfile.TemporaryDirectory() as folder:
        build(folder, args.depth)
        for name, target in (("stock", 0), (f"flowcut_{args.target}", args.target)):
            done = subprocess.run([sys.executable, __file__, args.out, "--size", str(args.size), "--requests",
                                   str(args.requests), "--engine", folder, str(target)],
                                  capture_output=True, text=True)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
            results[name] = json.loads(lines[-1][7:])
            print(name, results[name], flush=True)
    with open(args.out, "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()

"""Demo: FlowCut on a CLIP ViT-L/14-336-shaped encoder against the unpruned model.

    python -m flowcut_kernels.demo [--target 64] [--batch 1] [--device auto] [--repeats 3] [--json PATH]

The model has random weights (seeded) with sharpened attention (see flowcut_kernels.synthetic),
so the adaptive schedule prunes as it would on a trained CLIP. "unpruned" is the stock HF forward
(SDPA attention, all layers, as a LLaVA tower runs it); "flowcut" is :func:`flowcut_kernels.encode`
up to the feature layer. Times are medians over ``--repeats`` runs after one warm-up each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch
import transformers

from . import FlowCutInputError, __version__, encode, synthetic
from .encoder import check_target, feature_index
from .ops import resolve_backend
from .towers import find_tower


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="clip-l-336", choices=sorted(synthetic.PRESETS))
    parser.add_argument("--target", type=int, default=64, help="patches kept (default 64 of 576)")
    parser.add_argument("--feature-layer", type=int, default=-2, help="LLaVA-1.5 reads layer -2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shape = synthetic.PRESETS[args.preset]
    try:  # bad arguments are a usage error, before minutes of model building
        backend = resolve_backend(args.backend, device)
        check_target(args.target, (shape["image_size"] // shape["patch_size"]) ** 2)
        feature_index(args.feature_layer, shape["num_hidden_layers"])
    except FlowCutInputError as error:
        parser.error(str(error))
    print(f"flowcut_kernels {__version__}, torch {torch.__version__}, device {device}, {dtype}, backend {backend}")
    print(f"building a random {args.preset} vision model (seed {args.seed}, q/k sharpened "
          f"x{synthetic.DEFAULT_SHARPEN:g}) ...", flush=True)
    model = synthetic.random_clip_vision(args.preset, seed=args.seed, dtype=dtype, device=device)
    pixels = synthetic.random_pixels(model, args.batch, seed=args.seed)

    with torch.inference_mode():
        result = encode(model, pixels, args.target, feature_layer=args.feature_layer, backend=backend)
        print("tokens per layer:", " ".join(map(str, result.tokens_per_layer)))
        print(f"timing {args.repeats} runs each after a warm-up ...", flush=True)
        unpruned = _median_seconds(lambda: model(pixels), args.repeats, device)
        print(f"  unpruned  {unpruned * 1e3:9.1f} ms", flush=True)
        pruned = _median_seconds(
            lambda: encode(model, pixels, args.target, feature_layer=args.feature_layer, backend=backend),
            args.repeats, device,
        )
        patches = find_tower(model).num_patches
        print(f"  flowcut   {pruned * 1e3:9.1f} ms   {unpruned / pruned:.2f}x faster, "
              f"{args.target} of {patches} patches kept")
    if args.json:
        row = {
            "preset": args.preset, "batch": args.batch, "target": args.target,
            "feature_layer": args.feature_layer, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "sharpen": synthetic.DEFAULT_SHARPEN, "seed": args.seed, "repeats": args.repeats,
            "tokens_per_layer": result.tokens_per_layer,
            "unpruned_ms": unpruned * 1e3, "flowcut_ms": pruned * 1e3, "speedup": unpruned / pruned,
            "device": _device_name(device),
            "versions": {"flowcut_kernels": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "date": datetime.date.today().isoformat(),
        }
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

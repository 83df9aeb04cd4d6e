"""Prefill benchmark: FlowCut beside the unpruned model, the original-style FlowCut and other methods.

    python -m flowcut_kernels.bench                     # CLIP ViT-L/14-336, target 64, batch 1, CUDA else CPU
    python -m flowcut_kernels.bench --preset llava-1.5-7b --batch 1 8 32 --target 64 128 192 --json r.json
    python -m flowcut_kernels.bench --preset kernels    # one prune step per backend vs the copy bandwidth
    python -m flowcut_kernels.bench --model llava-hf/llava-1.5-7b-hf   # your own checkpoint (folder or HF cache)

Model presets (see :mod:`flowcut_kernels.bench.presets`) measure, in one run and interleaved, ``unpruned``
(the stock HF forward, SDPA), ``original`` (:mod:`.original`: eager attention with the full
probabilities, Python scoring, a host sync per prune step, every layer) and ``flowcut-<backend>``
(:func:`flowcut_kernels.encode`) for every backend available on the device; ``--methods`` adds the other
methods at the same target, ``visionzip``, ``fastv`` and ``downsample``:

    python -m flowcut_kernels.bench --preset llava-tiny --batch 1 4 --methods unpruned flowcut visionzip fastv

LLaVA presets time the first token (the prefill, then one greedy decode step); every row has its images/s.
The random weights are seeded and their q/k projections sharpened (``--sharpen``, see
:mod:`.random_models`) so the attention concentrates and the schedule prunes progressively; the
tokens each layer processed are printed.
``--model`` measures a real LLaVA, CLIP or SigLIP checkpoint instead (:mod:`flowcut_kernels.bench.checkpoint`).
Kernel presets are described in :mod:`flowcut_kernels.bench.kernels`; timing and memory in
:mod:`flowcut_kernels.bench.timing`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import sys

import torch

from .. import FlowCutInputError, __version__
from . import random_models
from ..models.encoder import check_target, feature_index
from ..models.registry import find_tower
from . import checkpoint, kernels, presets, scenarios
from .plots import write_plot
from .report import as_text, kernel_table, model_table, parent_writable, write_json, write_markdown
from .timing import Progress, Timer, peak_memory_mb

METHOD_FAMILIES = ("unpruned", "original", "flowcut", "static", "compiled", "per-image", "serial", "stage",
                   *presets.ALTERNATIVES)
PRESETS = sorted(presets.MODEL_PRESETS) + sorted(scenarios.SCENARIOS) + sorted(kernels.KERNEL_PRESETS)
KERNEL_DESCRIPTIONS = {
    "kernels": "one prune step per backend (CLIP-L/336 at B=1,16,64, a Qwen-VL image of 4096 and 16384 tokens on "
               "CUDA; fewer, smaller cases on a CPU) and the primitives attention_scores, text_guided_scores, "
               "topk_select, merge_nearest per backend vs their plain-PyTorch compositions",
    "kernels-tiny": "kernels at tiny sizes, for tests",
}


def preset_lines() -> list[str]:
    """One line per preset: its name and what it measures."""
    described = {**{k: v.description for k, v in presets.MODEL_PRESETS.items()},
                 **{k: v.description for k, v in scenarios.SCENARIOS.items()}, **KERNEL_DESCRIPTIONS}
    width = max(map(len, described))
    return [f"  {name:<{width}}  {described[name]}" for name in PRESETS]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowcut-bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets (--preset):\n" + "\n".join(preset_lines()),
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--preset", choices=PRESETS, help="what to measure, with random weights (default clip-l-336)")
    what.add_argument("--model", metavar="PATH_OR_ID",
                      help="measure this checkpoint instead: a folder, or a Hub id in the local Hugging Face cache "
                      "(nothing is downloaded); LlavaForConditionalGeneration, CLIPVisionModel, "
                      "CLIPVisionModelWithProjection, SiglipVisionModel, or a CLIPModel / SiglipModel's vision tower")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes to sweep (default 1)")
    p.add_argument("--target", type=int, nargs="+", metavar="T",
                   help="patches kept, to sweep (default 64; 8 for the tiny presets)")
    p.add_argument("--feature-layer", type=int, default=None,
                   help="feature layer, from the end (default -2, as LLaVA-1.5; a LLaVA checkpoint's own)")
    p.add_argument("--methods", nargs="+", choices=METHOD_FAMILIES,
                   help="method families (default: the preset's; per-image, serial and stage are named "
                   "<family>-<backend>)")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="flowcut backends (default every backend available on the device)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, help="timed calls per method (default 9 on CPU, 20 on CUDA; kernels 20/100)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 1 on CPU, 3 on CUDA; at least 1 is run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--sharpen", type=float,
                   help=f"q/k projection factor of the random tower (default {random_models.DEFAULT_SHARPEN:g}; "
                   "not with --model)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown with device, versions and date")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG: times and speed-ups per method (bars, or lines over a sweep; needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check every argument before any model is built; a bad one is an argparse usage error (exit 2)."""
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r} is not a device: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: choose auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch ({torch.__version__}); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    args.device = device
    args.dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.float16 if device.type == "cuda" else torch.float32)
    args.preset = args.preset or (None if args.model else "clip-l-336")
    kernel_preset = args.preset in kernels.KERNEL_PRESETS
    gpu = device.type == "cuda"
    args.repeats = args.repeats if args.repeats is not None else (100 if gpu else 20) if kernel_preset else (
        20 if gpu else 9)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 3) if kernel_preset else (3 if gpu else 1)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be 0 or more")
    for b in args.batch or []:
        if b < 1:
            parser.error(f"--batch {b}: batch sizes must be at least 1")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path and not parent_writable(path):
            parser.error(f"{flag} {path}: its directory does not exist or is not writable")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")

    usable, skipped = kernels.measurable_backends(device)
    if args.backends:
        args.backends = list(dict.fromkeys(args.backends))
        for name in args.backends:
            if name in skipped:
                parser.error(f"--backends {name}: not measurable on {device}: {skipped[name]}")
            if name not in usable:
                parser.error(f"--backends {name}: unknown backend; choose from {usable}")
        args.skipped = {}
    else:
        args.backends = usable
        args.skipped = skipped

    if kernel_preset:
        for flag, value in (("--target", args.target), ("--feature-layer", args.feature_layer),
                            ("--methods", args.methods), ("--sharpen", args.sharpen)):
            if value is not None:
                parser.error(f"{flag} does not apply to --preset {args.preset}: it times one prune step on random "
                             "q/k/v (no model), keeping about half the tokens, for every flowcut backend")
        if "torch" not in args.backends:
            args.backends = ["torch", *args.backends]  # the reference the speed-ups are measured against
        return

    if args.model:
        shape = _checked_checkpoint(parser, args)
        where = f"--model {args.model}"
        families = presets.ENCODER_FAMILIES
        default_methods = list(presets.BASE)
    else:
        shape = presets.MODEL_PRESETS.get(args.preset) or scenarios.SCENARIOS[args.preset]
        if shape.cuda_only and device.type != "cuda":
            parser.error(f"--preset {args.preset} runs on CUDA only: {shape.cuda_only}")
        where = f"preset {args.preset}"
        families = shape.families
        default_methods = shape.default_methods(device)
    args.batch = args.batch or list(getattr(shape, "default_batch", (1,)))
    args.methods = list(dict.fromkeys(args.methods)) if args.methods else default_methods
    for family in args.methods:
        if family not in families:
            parser.error(f"--methods {family} does not apply to {where}; choose from {' '.join(families)}")
    if isinstance(shape, scenarios.Scenario):
        args.sharpen = shape.sharpen if args.sharpen is None else args.sharpen
        if args.feature_layer is not None:
            parser.error(f"--feature-layer does not apply to --preset {args.preset}: it measures the model's own "
                         "feature layer, as its config sets it; leave --feature-layer out")
        args.target = args.target or list(shape.default_targets)
        for t in args.target:
            why = shape.check_target(t)
            if why:
                parser.error(why)
        return
    if not args.model:
        args.sharpen = random_models.DEFAULT_SHARPEN if args.sharpen is None else args.sharpen
    args.target = args.target or [64 if shape.num_patches > 64 else shape.num_patches // 8]
    args.feature_layer = -2 if args.feature_layer is None else args.feature_layer
    try:
        for t in args.target:
            check_target(t, shape.num_patches, "--target")
            if "stage" in args.methods and 2 * t >= shape.num_patches:
                raise FlowCutInputError(f"--target {t} is too large for the stage rows: the tower keeps 2·target, "
                                        f"which must be below the {shape.num_patches} patches")
            if "visionzip" in args.methods and t < 2:
                raise FlowCutInputError(f"--target {t} is too small for visionzip: it keeps at least one dominant and "
                                        "one contextual token")
        feature_index(args.feature_layer, shape.num_layers)
    except FlowCutInputError as error:
        parser.error(f"{error} ({where}: {shape.num_patches} patches, {shape.num_layers} layers)")


def _checked_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> checkpoint.Checkpoint:
    """The --model checkpoint's configuration, checked (no weight is loaded); a LLaVA sets the feature layer."""
    if args.sharpen is not None:
        parser.error("--sharpen does not apply to --model: a trained checkpoint's attention is measured as it is")
    try:
        found = checkpoint.inspect(args.model)
    except checkpoint.CheckpointError as error:
        parser.error(f"--model {args.model}: {error}")
    if found.feature_layer is not None:
        if args.feature_layer not in (None, found.feature_layer):
            parser.error(f"--feature-layer {args.feature_layer} differs from the LLaVA checkpoint's "
                         f"config.vision_feature_layer ({found.feature_layer}), whose features its projector was "
                         "trained on; leave --feature-layer out")
        args.feature_layer = found.feature_layer
    args.checkpoint = found
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {model}, {torch.get_num_threads()} threads"


def versions(device: torch.device) -> dict:
    out = {"flowcut_kernels": __version__, "torch": torch.__version__,
           "transformers": importlib.metadata.version("transformers"), "python": platform.python_version()}
    try:
        out["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
    return out


def _build(args) -> presets.Built:
    """The models to measure: the --model checkpoint, or the preset's seeded random ones."""
    if args.model:
        found = args.checkpoint
        where = "" if found.local else ", from the local Hugging Face cache (local_files_only=True)"
        print(f"loading {args.model} ({found.description}) with from_pretrained{where}; random pixels"
              f"{' and prompt' if found.family == 'llava' else ''}, seed {args.seed}", flush=True)
        built = checkpoint.load(found, args.device, args.dtype, args.seed)
    elif args.preset in scenarios.SCENARIOS:
        preset = scenarios.SCENARIOS[args.preset]
        print(f"building {preset.name} ({preset.description}); random weights, seed {args.seed}, "
              f"q/k x{args.sharpen:g}", flush=True)
        built = preset.build(args.device, args.dtype, args.seed, args.sharpen)
    else:
        preset = presets.MODEL_PRESETS[args.preset]
        print(f"building {preset.name} ({preset.description}); random weights, seed {args.seed}, "
              f"q/k x{args.sharpen:g}", flush=True)
        built = presets.build(preset, args.device, args.dtype, args.seed, args.sharpen)
    print(f"  {built.weights_mb:.0f} MiB of weights on {args.device}", flush=True)
    return built


def _original(args, built: presets.Built) -> bool:
    """Whether to measure the original-style baseline (printing why not when it was asked for but cannot run)."""
    if "original" not in args.methods:
        return False
    if not find_tower(built.tower).has_cls:
        print(f"original: skipped — the original-style baseline (flowcut_kernels/bench/original.py) re-implements "
              f"FlowCut for CLIP towers only; this tower is a {type(built.tower).__name__}", flush=True)
        return False
    return True


def _run_models(args, info: dict) -> list[dict]:
    built = _build(args)
    original = _original(args, built)
    scenario = isinstance(built, scenarios.BuiltScenario)
    n_methods = ("unpruned" in args.methods) + original + sum(
        m in args.methods for m in presets.ALTERNATIVES) + len(args.backends) * sum(
        f in args.methods for f in ("flowcut", "static", "compiled", "per-image", "serial")
        + (("stage",) if getattr(built, "prefill", None) is not None else ()))
    calls = max(args.warmup, 1) + args.repeats
    bar = Progress(len(args.batch) * len(args.target) * n_methods * calls, enabled=not args.no_progress)
    timer = Timer(args.device)
    rows = []
    for batch in args.batch:
        pixels = None if scenario else random_models.random_pixels(built.tower, batch, seed=args.seed)
        for target in args.target:
            label = f"B={batch} T={target}"
            if scenario:
                fns = built.methods(batch, target, args.backends, set(args.methods), args.seed)
            else:
                fns = presets.methods(built, pixels, target, args.feature_layer, args.backends,
                                      set(args.methods), original)
            with torch.inference_mode():
                first, peaks = {}, {}
                for name, fn in fns.items():  # warm-up; the last warm-up call also gives the peak memory
                    for _ in range(max(args.warmup, 1) - 1):
                        bar.running(f"{label} {name} warm-up")
                        fn()
                        bar.step()
                    bar.running(f"{label} {name} warm-up")
                    peaks[name] = peak_memory_mb(lambda fn=fn, name=name: first.update({name: fn()}), args.device)
                    bar.step()
                timings = timer.round_robin(fns, args.repeats, bar, label)
            _print_schedules(label, first)
            group = []
            for name, timing in timings.items():
                result = first[name]
                row = dict(
                    method=name, preset=built.name, batch=batch, target=target, tokens_out=result.tokens_out,
                    median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                    images_per_s=1e3 * batch / timing.median_ms, measured=measured(result),
                    peak_mem_mb=peaks[name], **info,
                    feature_layer=args.feature_layer, tokens_per_layer=result.tokens_per_layer,
                    lm_tokens=result.lm_tokens, times_ms=list(timing.times_ms), settings=result.settings,
                )
                if "original" in first and result.keep_indices is not None and name != "original":
                    row["agreement_with_original"] = presets.agreement(
                        result.keep_indices, first["original"].keep_indices)
                adaptive = first.get(_adaptive_of(name))
                if adaptive is not None:
                    row["agreement_with_adaptive"] = presets.agreement(result.keep_indices, adaptive.keep_indices)
                group.append(row)
            for row in group:
                for base in ("unpruned", "original"):
                    ref = timings.get(base)
                    row[f"speedup_vs_{base}"] = ref.median_ms / row["median_ms"] if ref else None
                flops = first[row["method"]].flops
                if flops is not None:  # the scenario's FLOP model: the speed-up its arithmetic alone allows
                    row["gflops"] = flops / 1e9
                    if "unpruned" in first:
                        row["flop_limit_vs_unpruned"] = first["unpruned"].flops / flops
                if row["method"].startswith("per-image-"):  # one batched pass vs B serial passes, same backend
                    ref = timings.get("serial-" + row["method"].removeprefix("per-image-"))
                    row["speedup_vs_serial"] = ref.median_ms / row["median_ms"] if ref else None
            rows += group
    return rows


#: What a model row's time covers (its ``measured``).
MEASURED = {
    "ttft": "time to first token: the prefill, then one greedy decode step on its cache",
    "prefill": "the prefill (last-position logits)",
    "vision": "the vision tower's features",
}


def measured(result: presets.MethodResult) -> str:
    """A key of :data:`MEASURED`: LLaVA presets and checkpoints time the first token, the LLaVA-NeXT and Qwen2-VL
    whole-model presets the prefill, the others the tower."""
    if result.first_step is not None:
        return "ttft"
    return "vision" if result.lm_tokens is None else "prefill"


def _print_schedules(label: str, first: dict) -> None:
    """The tokens each layer processed, per pruning method, and whether the kept patches agree."""
    for name, result in first.items():
        if name == "unpruned":
            continue
        print(f"{label} {name}: tokens per layer {' '.join(map(str, result.tokens_per_layer))}", flush=True)
        if name != "original" and "original" in first and result.keep_indices is not None:
            share = presets.agreement(result.keep_indices, first["original"].keep_indices)
            print(f"{label} {name}: keeps {share:.1%} of the patches original keeps", flush=True)
        adaptive = first.get(_adaptive_of(name))
        if adaptive is not None:
            share = presets.agreement(result.keep_indices, adaptive.keep_indices)
            print(f"{label} {name}: keeps {share:.1%} of the patches the adaptive schedule keeps", flush=True)


def _adaptive_of(name: str) -> str | None:
    """The adaptive row a static-schedule row is compared with: static-/compiled-<backend> -> flowcut-<backend>."""
    family, _, backend = name.partition("-")
    return f"flowcut-{backend}" if family in ("static", "compiled") else None


def _kernel_rows(args, info: dict) -> tuple[list[dict], float]:
    raw, copy_gbps = kernels.run(
        args.preset, args.device, args.dtype, args.backends, batches=args.batch, warmup=args.warmup,
        repeats=args.repeats, progress=not args.no_progress,
    )
    rows = []
    for r in raw:
        row = dict(
            method="composition" if r["backend"] == "composition" else f"flowcut-{r['backend']}",
            preset=args.preset, batch=r["batch"], target=r["keep"],
            tokens_out=r["keep"], median_ms=r["median_us"] / 1e3, p20_ms=r["p20_us"] / 1e3,
            p80_ms=r["p80_us"] / 1e3, peak_mem_mb=r["peak_mem_mb"], **info, copy_gbps=copy_gbps,
        )
        rows.append({**row, **{k: v for k, v in r.items() if k not in row}})
    return rows, copy_gbps


def main(argv: list[str] | None = None) -> None:
    """The ``flowcut-bench`` command (a console script: it must return None, its exit status 0)."""
    run(argv)


def run(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark the command line ``argv`` asks for; returns the rows (also printed / written)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    command = "python -m flowcut_kernels.bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    dtype_name = str(args.dtype).removeprefix("torch.")
    info = dict(device=device_name(args.device), versions=versions(args.device), dtype=dtype_name,
                date=datetime.date.today().isoformat(), seed=args.seed, sharpen=args.sharpen,
                warmup=args.warmup, repeats=args.repeats)
    if args.model:
        info["model_class"] = args.checkpoint.class_name
    if args.device.type == "cpu" and hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other work on the cores skews CPU timings
    vs = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"{vs}\ndevice {args.device} ({info['device']}), {dtype_name}, "
          f"backends {', '.join(args.backends) or 'none'}", flush=True)
    for name, why in args.skipped.items():
        print(f"backend {name}: skipped — {why}", flush=True)

    kernel_preset = args.preset in kernels.KERNEL_PRESETS
    if kernel_preset:
        rows, copy_gbps = _kernel_rows(args, info)
        lines = kernel_table(rows)
        facts = [f"copy bandwidth {copy_gbps:.1f} GB/s (dst.copy_(src), read + write counted)"]
        overhead = kernels.wrapper_overhead(args.device, args.dtype, args.backends)
        facts.append("wrapper overhead at B=1, public op / raw torch op (host µs per call): " + ", ".join(
            f"{r['op']} {r['backend']} {r['public_us']:.1f}/{r['raw_us']:.1f} = {r['ratio']:.2f}x" for r in overhead))
        title = f"FlowCut prune step and primitives per backend ({args.preset})"
    else:
        rows = _run_models(args, info)
        lines = model_table(rows)
        if args.model:
            facts = [f"checkpoint {args.model}: {args.checkpoint.description}; its own weights, random inputs "
                     f"(seed {args.seed}); feature layer {args.feature_layer}"]
        elif args.preset in scenarios.SCENARIOS:
            facts = [f"{scenarios.SCENARIOS[args.preset].description}; q/k sharpened x{args.sharpen:g} "
                     f"(seed {args.seed})"]
        else:
            facts = [f"feature layer {args.feature_layer}, q/k sharpened x{args.sharpen:g} (seed {args.seed})"]
        facts += [f"time: {MEASURED[key]}" for key in dict.fromkeys(r["measured"] for r in rows)]
        title = f"FlowCut prefill benchmark ({args.model or args.preset})"
    if "load_avg_1min" in info:
        end_load = round(os.getloadavg()[0], 2)
        for row in rows:
            row["load_avg_1min_end"] = end_load
        facts.append(f"1-minute load average {info['load_avg_1min']} at the start, {end_load} at the end, on "
                     f"{os.cpu_count()} cores (other work on the cores slows every method)")
    timing = "CUDA events" if args.device.type == "cuda" else "time.perf_counter"
    when = "one call after the warm-up" if kernel_preset else "the last warm-up call"
    facts.append(f"{max(args.warmup, 1)} warm-up + {args.repeats} timed calls per method, interleaved; "
                 f"median, p20, p80 by {timing}; peak memory: {when}, above the level before it")
    print(f"\n{title}: {info['device']}, {dtype_name}\n" + "\n".join(facts) + "\n" + as_text(lines), flush=True)
    if not kernel_preset:
        _print_summary(rows)

    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.markdown:
        header = [f"Command: `{command}`", f"Date: {info['date']}", f"Device: {args.device}, {info['device']}",
                  "Versions: " + vs, f"dtype: {dtype_name}", *facts]
        notes = [] if kernel_preset else _schedule_notes(rows)
        write_markdown(args.markdown, title, header, lines, notes)
        print(f"wrote {args.markdown}")
    if args.plot:
        write_plot(args.plot, rows, title, f"{info['device']} · {dtype_name} · {info['date']}")
        print(f"wrote {args.plot}")
    return rows


def _print_summary(rows: list[dict]) -> None:
    for r in rows:
        if r["method"] not in ("unpruned", "original"):
            parts = [f"{r[f'speedup_vs_{b}']:.2f}x the speed of {b}" for b in ("unpruned", "original", "serial")
                     if r.get(f"speedup_vs_{b}") is not None]
            if parts:
                print(f"B={r['batch']} T={r['target']} {r['method']}: " + ", ".join(parts))


METHOD_NOTES = [
    "Methods: `unpruned` — the stock HF forward (SDPA), `output_hidden_states=True`, all layers, features "
    "`hidden_states[F]` without the CLS row (as LLaVA-1.5 takes them); `original` — "
    "flowcut_kernels/bench/original.py, the published approach re-implemented for CLIP towers (eager attention "
    "keeping every layer's S×S probabilities, Python scoring from their CLS row, a host sync per prune step, every "
    "layer run); `flowcut-<backend>` — `flowcut_kernels.encode` (layers 0…F only), one schedule for the batch; "
    "`static-<backend>` — `encode(..., schedule=static)`, the per-layer counts fixed in advance by "
    "`calibrate_schedule` on other images (no host read); `compiled-<backend>` — the same static encode compiled "
    "whole (`torch.compile(fullgraph=True, dynamic=False)`, on CUDA `mode=\"reduce-overhead\"`: CUDA graphs; the "
    "compile is part of the warm-up); `per-image-<backend>` — "
    "`encode(..., schedule=\"per_image\")`, each image on its own schedule, all in ONE padded pass; "
    "`serial-<backend>` — the same result the old way, B single-image `encode` calls one after the other "
    "(vs serial = serial time / per-image time, same backend); `stage-<backend>` — `flowcut(llava, K, "
    "llm_stage=True)`, the whole LLaVA forward (tower to 2K per image, decoder layer 1 keeps K); the other methods "
    "at the same target: `visionzip` — VisionZip (flowcut_kernels/recipes/visionzip.py) on the stock tower's feature "
    "layer, dominant + contextual tokens (54 + 10 of 64, scaled); `fastv` — the stock tower, then FastV "
    "(flowcut_kernels/recipes/fastv.py) in the language model: after decoder layer 1 (layer 0 in a 2-layer model) "
    "the target image tokens the last prompt token attends to most (on a tower preset, which has no language "
    "model, the stock tower alone); `downsample` — the image resized (bilinear, antialiased) to a g×g patch grid, "
    "g = round(√target), through the stock tower with its position embeddings interpolated. LLaVA presets time "
    "the first token: the prefill, then one greedy decode step on its cache. LLaVA-NeXT and Qwen2-VL presets: see "
    "`flowcut_kernels/bench/scenarios.py`.",
    "",
]


def _schedule_notes(rows: list[dict]) -> list[str]:
    """The method notes, each pruning row's tokens per layer, and its kept-set agreement where measured (the share
    of the kept patches that original / the adaptive schedule keeps too)."""
    notes = [*METHOD_NOTES, "Tokens per layer:", ""]
    agree = []
    for r in rows:
        if r["method"] != "unpruned":
            notes.append(f"- B={r['batch']} T={r['target']} {r['method']}: "
                         + " ".join(map(str, r["tokens_per_layer"])))
        shares = [f"{r[key]:.1%} of {what}'s" for key, what in (("agreement_with_original", "original"),
                                                                 ("agreement_with_adaptive", "the adaptive schedule"))
                  if r.get(key) is not None]
        if shares:
            agree.append(f"- B={r['batch']} T={r['target']} {r['method']}: keeps {' and '.join(shares)} patches")
    return notes + (["", "Kept-set agreement:", "", *agree] if agree else [])


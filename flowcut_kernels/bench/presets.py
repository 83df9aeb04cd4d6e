"""Model presets and the methods :mod:`flowcut_kernels.bench` measures on them.

Encoder presets run a random CLIP vision tower (:mod:`.random_models`, seeded, q/k sharpened so
the attention concentrates and the schedule prunes progressively) and return LLaVA's features: the
feature layer's patch rows. LLaVA presets add a LLaVA-1.5 projector (Linear → GELU → Linear) and a
Llama language model, and measure the whole prefill: tower → projector → language model on a prompt
with the projected image features inserted (``inputs_embeds``, ``use_cache=True``, logits of the last
position only, as ``generate`` does it). Everything is built directly on the target device in the
target dtype (no CPU copy of the weights). A checkpoint given to ``--model`` (:mod:`.checkpoint`) is
measured by the same methods.

Methods, each a zero-argument callable returning a :class:`MethodResult`:

- ``unpruned`` — the stock HF forward (its SDPA attention), ``output_hidden_states=True``, all layers run,
  features ``hidden_states[feature_layer][:, 1:]`` (all rows where ``Built.drop_first`` is False) — how LLaVA
  calls its tower;
- ``original`` — the original-style FlowCut of :mod:`.original` (eager attention with the full
  probabilities, Python scoring, a host sync per prune step, every layer run), on CLIP towers only;
- ``flowcut-<backend>`` — :func:`flowcut_kernels.encode` with that backend (layers 0 … F only), one schedule
  for the batch (the batch rule);
- ``static-<backend>`` — ``encode(..., schedule=static)``: the per-layer counts fixed in advance by
  :func:`flowcut_kernels.calibrate_schedule` on :data:`CALIBRATION_IMAGES` other random images (not timed): no
  host read; its kept-set agreement with ``flowcut-<backend>`` (the adaptive schedule) is reported;
- ``compiled-<backend>`` — the same static encode compiled whole, ``torch.compile(fullgraph=True, dynamic=False)``,
  on CUDA with ``mode="reduce-overhead"`` (CUDA graphs: the pass replays without a launch per kernel); the compile
  is part of the warm-up, not timed;
- ``per-image-<backend>`` — ``encode(..., schedule="per_image")``: each image on its own schedule, all images in
  ONE padded pass (what the LLaVA patch runs);
- ``serial-<backend>`` — the same per-image result the old way: B single-image ``encode`` calls, one after the
  other, features concatenated (then one batched prefill on LLaVA presets);
- ``stage-<backend>`` (LLaVA presets) — ``flowcut(llava, K, llm_stage=True)``: the whole LLaVA-1.5 forward
  (``input_ids`` with K placeholders per image, ``pixel_values``, ``use_cache=True``, last-position logits): the
  tower on per-image schedules to 2K, decoder layers 0–1 on the long prompt (P + 2K), layer 1 keeps K per image
  by the text-guided score, the other layers on P + K. The same tower, projector and language-model weights as
  the other rows (one ``LlavaForConditionalGeneration`` assembled around them).

Other methods at the same target (one row each; ``--methods``):

- ``visionzip`` — VisionZip (:mod:`flowcut_kernels.recipes.visionzip`) on the stock tower's feature layer, its q
  and k captured through the attention seam: ``dominant`` + ``contextual`` tokens, VisionZip's 54 + 10 of 64 scaled
  to the target (:func:`visionzip_split`); every layer runs on all tokens;
- ``fastv`` — the stock tower, then FastV (:mod:`flowcut_kernels.recipes.fastv`) in the language model: after
  decoder layer 1 (layer 0 in a 2-layer model; :func:`fastv_layer`) the prompt keeps the ``target`` image tokens its
  last token attends to most. On an encoder preset, which has no language model, the row is the stock tower;
- ``downsample`` — the image resized (bilinear, antialiased) to g×g patches, g = round(√target)
  (:func:`downsample_grid`), through the stock tower with its position embeddings interpolated: g² tokens, no
  pruning; it costs the detail the resize loses, and keeps the whole image's layout.

On LLaVA presets every method's call is the time to first token: the prefill (:class:`LlavaPrefill`, or the
stage's whole LLaVA), then one greedy decode step on the cache it filled (:func:`decode_step`); the prefill's
logits are the method's ``output``, the decode step's its ``first_step``.

Other presets (LLaVA-NeXT, Qwen2-VL) are in :mod:`.scenarios`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .. import StaticSchedule, calibrate_schedule, encode
from . import random_models
from ..models import seams
from ..models.attention import capturing
from ..models.encoder import feature_index
from . import original as original_baseline
from ..models.registry import find_tower
from ..recipes.fastv import fastv_prefill
from ..recipes.visionzip import visionzip as recipes_visionzip

#: Vicuna-7B (LLaVA-1.5-7B's language model) shapes.
VICUNA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
)
#: The LLaVA prompt: 60 text tokens, the image after 35 of them (LLaVA-1.5's system prompt and "USER:" first).
PROMPT_TOKENS = 60
IMAGE_POSITION = 35
TINY_LM = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
)


@dataclass(frozen=True)
class ModelPreset:
    """A benchmark model: a random CLIP tower, plus a projector and language model for LLaVA presets.

    tower: a :data:`flowcut_kernels.bench.random_models.PRESETS` name. lm: ``LlamaConfig`` fields, or None for the
    encoder alone. prompt_tokens: text tokens of the prompt; the image features go in after
    ``image_position`` of them (LLaVA-1.5's system prompt and "USER:" come first).
    """

    name: str
    tower: str
    description: str
    lm: dict | None = None
    prompt_tokens: int = PROMPT_TOKENS
    image_position: int = IMAGE_POSITION
    cuda_only: str | None = None  # why the preset cannot run on a CPU, if it cannot
    default_batch: tuple[int, ...] = (1,)
    methods: tuple[str, ...] = ("unpruned", "original", "flowcut", "static")  # the default method families
    cuda_methods: tuple[str, ...] | None = None  # the default families on CUDA, when they differ

    def default_methods(self, device: torch.device) -> list[str]:
        cuda = torch.device(device).type == "cuda" and self.cuda_methods is not None
        return list(self.cuda_methods if cuda else self.methods)

    @property
    def families(self) -> tuple[str, ...]:
        """Every method family that applies (``--methods`` may pick any of them)."""
        return ENCODER_FAMILIES + (("stage",) if self.lm is not None else ())

    @property
    def num_patches(self) -> int:
        shape = random_models.PRESETS[self.tower]
        return (shape["image_size"] // shape["patch_size"]) ** 2

    @property
    def num_layers(self) -> int:
        return random_models.PRESETS[self.tower]["num_hidden_layers"]


#: Method families of the CLIP / LLaVA-1.5 presets (``--methods``); LLaVA presets add "stage".
ENCODER_FAMILIES = ("unpruned", "original", "flowcut", "static", "compiled", "per-image", "serial", "visionzip",
                    "fastv", "downsample")
#: The other methods, at the same target (one row each, not per backend).
ALTERNATIVES = ("visionzip", "fastv", "downsample")
BASE = ("unpruned", "original", "flowcut", "static")
#: Random images the static schedule is calibrated on (another seed than the timed ones).
CALIBRATION_IMAGES = 8
RAGGED = ("per-image", "serial")

MODEL_PRESETS = {
    "clip-l-336": ModelPreset(
        "clip-l-336", "clip-l-336", "CLIP ViT-L/14-336 vision tower (LLaVA-1.5's), 577 tokens "
        "(on CUDA also the per-image pass vs serial single-image passes)", cuda_methods=BASE + RAGGED,
    ),
    "clip-tiny": ModelPreset("clip-tiny", "tiny", "a tiny CLIP tower for tests (6 layers, 65 tokens, C=32)"),
    "llava-1.5-7b": ModelPreset(
        "llava-1.5-7b", "clip-l-336",
        "LLaVA-1.5-7B prefill: CLIP-L/336 tower + projector + Vicuna-7B-shaped LM, 60-token prompt; also "
        "per-image vs serial tower passes and the language-model stage (CUDA only)",
        lm=VICUNA_7B, methods=BASE + RAGGED + ("stage",),
        cuda_only="Vicuna-7B needs 27 GB in float32 and minutes per prefill on a CPU; "
        "run it on a CUDA GPU, or use --preset llava-tiny on a CPU",
    ),
    "llava-tiny": ModelPreset(
        "llava-tiny", "tiny", "a tiny LLaVA: tiny tower + projector + 2-layer LM, 12-token prompt, also with the "
        "language-model stage (stage-<backend>)",
        lm=TINY_LM, prompt_tokens=12, image_position=7, methods=BASE + ("stage",),
    ),
    "ragged-clip-l-336": ModelPreset(
        "ragged-clip-l-336", "clip-l-336", "CLIP-L/336 tower at B=8, per-image schedules: ONE batched pass "
        "(encode schedule='per_image') vs 8 serial single-image passes, per backend",
        default_batch=(8,), methods=RAGGED,
    ),
    "ragged-tiny": ModelPreset(
        "ragged-tiny", "tiny", "ragged-clip-l-336 on the tiny tower, B=3, for tests",
        default_batch=(3,), methods=RAGGED,
    ),
}


@dataclass
class MethodResult:
    """What one call of a method gives back.

    output: the features (B, tokens_out, C) for an encoder, the last position's logits (B, 1, V) for LLaVA.
    keep_indices: (B, tokens_out) kept patch indices, or None (unpruned). tokens_per_layer: tokens each run
    vision layer processed. tokens_out: visual tokens per image that reach the output / the language model.
    A LLaVA preset's call is the time to first token: the prefill, then one greedy decode step on its cache.
    """

    output: Tensor
    keep_indices: Tensor | None
    tokens_per_layer: list[int]
    tokens_out: int
    lm_tokens: int | None = None  # prefill length (prompt + visual tokens) for LLaVA presets
    first_step: Tensor | None = None  # LLaVA presets: the logits (B, 1, V) of the first decode step after the prefill
    settings: dict = field(default_factory=dict)  # the method's settings, for the JSON rows
    flops: float | None = None  # the prefill's floating-point operations, where the scenario models them


class LlavaPrefill(nn.Module):
    """LLaVA-1.5's projector and language model: image features → prefill logits.

    lm: a causal LM taking ``inputs_embeds`` (a ``LlamaForCausalLM``, or a whole
    ``LlavaForConditionalGeneration``, which then runs its language model only). prompt_ids: (1, P) token ids;
    the image goes in after ``image_position`` of them.
    """

    def __init__(self, projector: nn.Module, lm: nn.Module, prompt_ids: Tensor, image_position: int):
        super().__init__()
        self.projector = projector
        self.lm = lm
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.image_position = image_position

    def embeds(self, features: Tensor) -> Tensor:
        """features (B, V, C_vision) → the prompt's embeddings with the projected features inserted (B, P + V, C)."""
        image = self.projector(features)
        text = self.lm.get_input_embeddings()(self.prompt_ids).expand(features.shape[0], -1, -1)
        pos = self.image_position
        return torch.cat([text[:, :pos], image, text[:, pos:]], dim=1)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, V, C_vision) → logits (B, 1, vocab) of the last prompt position."""
        return self.lm(inputs_embeds=self.embeds(features), use_cache=True, logits_to_keep=1).logits

    def first_token(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The time-to-first-token work: the prefill, then one greedy decode step on its cache; returns the
        prefill's last-position logits (B, 1, vocab) and the decode step's."""
        out = self.lm(inputs_embeds=self.embeds(features), use_cache=True, logits_to_keep=1)
        return out.logits, decode_step(self.lm, out.logits, seams.output_cache(out))


def decode_step(lm: nn.Module, logits: Tensor, cache) -> Tensor:
    """One greedy decode step of the causal LM ``lm`` after a prefill that gave ``logits`` (B, 1, V) and ``cache``;
    returns its logits (B, 1, V). The next position is the cache's length (its first layer's)."""
    token = logits[:, -1:].argmax(-1)
    return lm(input_ids=token, use_cache=True, **seams.cache_arg(cache)).logits


@dataclass
class Built:
    """What a run measures, on one device: a vision tower and, for LLaVA, the prefill that follows it.

    name: the preset's name, or the checkpoint given to ``--model`` (the rows' ``preset``). tower: a CLIP or
    SigLIP vision model (what :func:`~flowcut_kernels.models.registry.find_tower` accepts). drop_first: the
    unpruned features drop row 0, the CLS row (LLaVA's "default" strategy). weights_mb: every weight, once.
    """

    name: str
    tower: nn.Module
    prefill: LlavaPrefill | None
    drop_first: bool
    weights_mb: float
    lm_config: dict | None = None  # LlamaConfig fields of a preset's language model (the stage's LLaVA needs it)
    _llava: dict = field(default_factory=dict)

    def llava(self, backend: str) -> nn.Module:
        """A ``LlavaForConditionalGeneration`` made of this tower, projector and language model (no weight
        copied: built on the meta device, then its modules replaced by these), one per backend, for
        ``flowcut(..., llm_stage=True)``. Its image token is id 0 (prompt ids are ≥ 3)."""
        if backend not in self._llava:
            self._llava[backend] = assemble_llava(self.tower, self.prefill, self.lm_config)
        return self._llava[backend]


#: The image placeholder id of :func:`assemble_llava` (random prompts use ids 3 and up).
IMAGE_TOKEN = 0


def assemble_llava(tower: nn.Module, prefill: LlavaPrefill, lm_config: dict) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` around ``tower`` and ``prefill``'s projector and language model."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=tower.config, text_config=LlamaConfig(**lm_config), image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    core = llava.model
    core.vision_tower = tower
    core.multi_modal_projector.linear_1 = prefill.projector[0]
    core.multi_modal_projector.linear_2 = prefill.projector[2]
    core.language_model = prefill.lm.model
    llava.lm_head = prefill.lm.lm_head
    left = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    assert not left, f"assemble_llava left {left} on the meta device"
    return llava.eval()


def weights_mb(*modules: nn.Module) -> float:
    """MiB of the parameters of ``modules``, each parameter counted once (the modules may share some)."""
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values()) / 2**20


def build(preset: ModelPreset, device: torch.device, dtype: torch.dtype, seed: int, sharpen: float) -> Built:
    """Build ``preset`` with seeded random weights directly on ``device`` in ``dtype``."""
    tower = random_models.random_clip_vision(preset.tower, seed=seed, sharpen=sharpen, dtype=dtype, device=device)
    prefill = None
    if preset.lm is not None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed + 1)
        vision_width = random_models.PRESETS[preset.tower]["hidden_size"]
        width = preset.lm["hidden_size"]
        with torch.device(device):
            lm = LlamaForCausalLM._from_config(LlamaConfig(**preset.lm), attn_implementation="sdpa", dtype=dtype)
            projector = nn.Sequential(
                nn.Linear(vision_width, width, dtype=dtype), nn.GELU(), nn.Linear(width, width, dtype=dtype)
            )
        prompt = random_prompt(preset.prompt_tokens, preset.lm["vocab_size"], device, seed)
        prefill = LlavaPrefill(projector, lm.eval(), prompt, preset.image_position).eval()
    modules = [tower] + ([prefill] if prefill is not None else [])
    return Built(preset.name, tower, prefill, True, weights_mb(*modules), lm_config=preset.lm)


def random_prompt(length: int, vocab_size: int, device: torch.device, seed: int) -> Tensor:
    """(1, length) seeded token ids in [3, vocab_size) (ids 0–2 are usually padding, start and end)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator, device=device)


def methods(
    built: Built,
    pixels: Tensor,
    target: int,
    feature_layer: int,
    backends: list[str],
    include: set[str],
    original: bool,
) -> dict[str, Callable[[], MethodResult]]:
    """The methods to measure for one (batch, target): name -> zero-argument callable.

    pixels: (B, 3, H, W). include: the method families asked for (:attr:`ModelPreset.families`).
    original: whether to measure the original-style baseline (:mod:`.original`; CLIP towers only).
    """
    tower, prefill = built.tower, built.prefill
    num_layers = len(find_tower(tower).layers)

    def finish(features: Tensor, kept: Tensor | None, tokens: list[int], **settings) -> MethodResult:
        if prefill is None:
            return MethodResult(features, kept, tokens, features.shape[1], settings=settings)
        logits, step = prefill.first_token(features)
        return MethodResult(logits, kept, tokens, features.shape[1], prefill.prompt_ids.shape[1] + features.shape[1],
                            step, settings)

    def stock(pixel_values: Tensor, **kwargs) -> tuple[Tensor, list[int], object]:
        """The stock tower, as LLaVA calls it: (features, tokens per layer, its output)."""
        out = tower(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        features = out.hidden_states[feature_layer][:, int(built.drop_first):]
        return features, [out.hidden_states[0].shape[1]] * num_layers, out

    def unpruned() -> MethodResult:
        features, tokens, _ = stock(pixels)
        return finish(features, None, tokens)

    def original_style() -> MethodResult:
        return finish(*original_baseline.encode_original(tower, pixels, target, feature_layer))

    def flowcut(backend: str) -> Callable[[], MethodResult]:
        def run() -> MethodResult:
            out = encode(tower, pixels, target, feature_layer=feature_layer, backend=backend)
            return finish(out.features, out.keep_indices, out.tokens_per_layer, target_num=target, backend=backend,
                          schedule="adaptive")

        return run

    schedules: dict[str, StaticSchedule] = {}

    def calibrated(backend: str) -> StaticSchedule:
        if backend not in schedules:
            calibration = random_models.random_pixels(tower, CALIBRATION_IMAGES, seed=1_000_003)
            with torch.inference_mode():
                schedules[backend] = calibrate_schedule(tower, calibration, target, feature_layer=feature_layer,
                                                        backend=backend)
        return schedules[backend]

    def static(backend: str) -> Callable[[], MethodResult]:
        schedule = calibrated(backend)

        def run() -> MethodResult:
            out = encode(tower, pixels, target, feature_layer=feature_layer, schedule=schedule, backend=backend)
            return finish(out.features, out.keep_indices, out.tokens_per_layer, target_num=target, backend=backend,
                          schedule=f"static ({CALIBRATION_IMAGES} calibration images)")

        return run

    def compiled(backend: str) -> Callable[[], MethodResult]:
        schedule = calibrated(backend)
        mode = "reduce-overhead" if pixels.is_cuda else None  # CUDA graphs on a GPU
        whole = torch.compile(lambda x: encode(tower, x, target, feature_layer=feature_layer, schedule=schedule,
                                               backend=backend), fullgraph=True, dynamic=False, mode=mode)

        def run() -> MethodResult:
            out = whole(pixels)  # a CUDA graph's outputs are overwritten by its next replay: copied out
            return finish(out.features.clone(), out.keep_indices.clone(), out.tokens_per_layer, target_num=target,
                          backend=backend, schedule=f"static ({CALIBRATION_IMAGES} calibration images)",
                          compile=f"fullgraph, mode={mode}")

        return run

    def per_image(backend: str) -> Callable[[], MethodResult]:
        def run() -> MethodResult:
            out = encode(tower, pixels, target, feature_layer=feature_layer, schedule="per_image", backend=backend)
            return finish(out.features, out.keep_indices, out.tokens_per_layer[0], target_num=target,
                          backend=backend, schedule="per_image")

        return run

    def serial(backend: str) -> Callable[[], MethodResult]:
        def run() -> MethodResult:
            outs = [encode(tower, pixels[i:i + 1], target, feature_layer=feature_layer, backend=backend)
                    for i in range(pixels.shape[0])]
            return finish(torch.cat([o.features for o in outs]), torch.cat([o.keep_indices for o in outs]),
                          outs[0].tokens_per_layer, target_num=target, backend=backend, schedule="adaptive, one image "
                          "per call")

        return run

    def visionzip() -> MethodResult:
        """VisionZip (the recipe) on the stock tower's feature layer, whose q and k the attention seam captures."""
        dominant, contextual = visionzip_split(target)
        layer = find_tower(tower).layers[feature_index(feature_layer, num_layers)]
        with capturing(tower.config) as seen:
            seen.watch = layer.self_attn
            out = tower(pixel_values=pixels, output_hidden_states=True)
        q, k, _, scale = seen.seen
        features = recipes_visionzip(out.hidden_states[feature_layer], q, k, scale=scale, dominant=dominant,
                                     contextual=contextual)
        return finish(features, None, [out.hidden_states[0].shape[1]] * num_layers, dominant=dominant,
                      contextual=contextual, feature_layer=feature_layer, backend="auto")

    def fastv() -> MethodResult:
        """The stock tower; on a LLaVA, FastV (the recipe) in the language model: after decoder layer ℓ − 1 the
        prompt keeps ``target`` image tokens, those its last token attends to most; then one decode step."""
        features, tokens, _ = stock(pixels)
        if prefill is None:
            return finish(features, None, tokens, keep=target, layer=None,
                          note="FastV prunes inside a language model; this preset has none, so the tower runs as is")
        layer = fastv_layer(prefill.lm)
        embeds = prefill.embeds(features)
        start = prefill.image_position
        text = language_model(prefill.lm)
        cache = seams.new_cache(text.config)
        hidden = fastv_prefill(text, embeds, (start, start + features.shape[1]), target, layer=layer, cache=cache)
        logits = prefill.lm.lm_head(hidden[:, -1:])
        prompt = prefill.prompt_ids.shape[1]
        return MethodResult(logits, None, tokens, target, prompt + target, decode_step(prefill.lm, logits, cache),
                            dict(keep=target, layer=layer, prompt_before=prompt + features.shape[1], backend="auto"))

    def downsample() -> MethodResult:
        """The image resized so the stock tower yields about ``target`` patches (a g×g grid, g = round(√target)),
        its position embeddings interpolated; no pruning."""
        grid, size = downsample_grid(tower, target)
        small = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        features, tokens, _ = stock(small, interpolate_pos_encoding=True)
        return finish(features, None, tokens, grid=grid, image_size=size, resize="bilinear, antialiased",
                      position_embeddings="interpolated")

    def stage(backend: str) -> Callable[[], MethodResult]:
        from .. import flowcut as patch

        llava = built.llava(backend)
        patch(llava, target, backend=backend, llm_stage=True)
        pos = prefill.image_position
        prompt = prefill.prompt_ids
        ids = torch.cat([prompt[:, :pos], torch.full((1, target), IMAGE_TOKEN, device=prompt.device),
                         prompt[:, pos:]], dim=1).expand(pixels.shape[0], -1)
        with torch.inference_mode():
            tokens = llava.model.get_image_features(pixels, return_dict=True).tokens_per_layer[0]
        lm_tokens = prompt.shape[1] + target

        def run() -> MethodResult:
            out = llava(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
            return MethodResult(out.logits, None, tokens, target, lm_tokens,
                                decode_step(llava, out.logits, seams.output_cache(out)),
                                dict(target_num=target, backend=backend, llm_stage=True))

        return run

    found: dict[str, Callable[[], MethodResult]] = {}
    if "unpruned" in include:
        found["unpruned"] = unpruned
    if "original" in include and original:
        found["original"] = original_style
    alternatives = dict(visionzip=visionzip, fastv=fastv, downsample=downsample)
    found.update({name: alternatives[name] for name in ALTERNATIVES if name in include})
    makers = (("flowcut", flowcut), ("static", static), ("compiled", compiled), ("per-image", per_image),
              ("serial", serial), ("stage", stage))
    for family, make in makers:
        if family in include and (family != "stage" or prefill is not None):
            for backend in backends:
                found[f"{family}-{backend}"] = make(backend)
    return found


def visionzip_split(target: int) -> tuple[int, int]:
    """(dominant, contextual) tokens of VisionZip at ``target`` ≥ 2: its 54 + 10 of 64, scaled (at least 1 each)."""
    contextual = min(max(1, round(target * 10 / 64)), target - 1)
    return target - contextual, contextual


def fastv_layer(lm: nn.Module) -> int:
    """FastV's layer: prune after decoder layer 2 − 1 (its K = 2), or after layer 0 in a 2-layer model."""
    return min(2, lm.config.get_text_config().num_hidden_layers - 1)


def language_model(lm: nn.Module) -> nn.Module:
    """The decoder (``LlamaModel``-like: ``layers``, ``rotary_emb``, ``norm``) of a causal LM or a whole LLaVA."""
    core = lm.model
    return getattr(core, "language_model", core)


def downsample_grid(tower: nn.Module, target: int) -> tuple[int, int]:
    """(g, pixels): the g×g patch grid nearest ``target`` patches (g = round(√target), at least 1) and the image
    side that gives it."""
    grid = max(1, round(target ** 0.5))
    return grid, grid * tower.config.patch_size


def agreement(a: Tensor, b: Tensor) -> float:
    """Share of kept patches two methods have in common: a, b (B, K) index sets → mean |a ∩ b| / K."""
    same = [len(set(x.tolist()) & set(y.tolist())) / max(len(x), 1) for x, y in zip(a.cpu(), b.cpu())]
    return sum(same) / len(same)

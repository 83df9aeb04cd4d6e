"""The benchmark's ragged-batch, language-model-stage, primitive, LLaVA-NeXT, Qwen2-VL, Gemma 3, LLaVA-OneVision,
ViT, DINOv2 and InternVL rows, at tiny sizes."""

import pytest
import torch

from flowcut_kernels import bench
from flowcut_kernels.bench.random_models import random_pixels
from flowcut_kernels.bench import cli, plots, scenarios
from flowcut_kernels.bench import kernels as bench_kernels
from flowcut_kernels.bench import presets as bench_models

FAST = ["--device", "cpu", "--repeats", "1", "--warmup", "1", "--no-progress"]


def cpu_backends():
    return bench_kernels.measurable_backends("cpu")[0]


def by_method(rows):
    return {r["method"]: r for r in rows}


# 1. ragged batches

def test_ragged_preset_compares_one_pass_with_serial_passes(tmp_path):
    rows = bench.run(["--preset", "ragged-tiny", "--target", "8", *FAST, "--markdown", str(tmp_path / "r.md")])
    found = by_method(rows)
    backends = cpu_backends()
    assert set(found) == {f"{f}-{b}" for f in ("per-image", "serial") for b in backends}
    for b in backends:
        one, serial = found[f"per-image-{b}"], found[f"serial-{b}"]
        assert one["batch"] == serial["batch"] == 3  # the preset's default batch
        assert one["speedup_vs_serial"] == pytest.approx(serial["median_ms"] / one["median_ms"])
        assert "speedup_vs_serial" not in serial and one["speedup_vs_unpruned"] is None
        assert one["tokens_out"] == serial["tokens_out"] == 8
        assert one["tokens_per_layer"] == serial["tokens_per_layer"]  # image 0's schedule, alone or batched
    assert "| vs serial |" in (tmp_path / "r.md").read_text()


def test_per_image_pass_gives_the_serial_result():
    preset = bench_models.MODEL_PRESETS["ragged-tiny"]
    built = bench_models.build(preset, torch.device("cpu"), torch.float32, 0, 16.0)
    pixels = random_pixels(built.tower, 3, seed=1)
    fns = bench_models.methods(built, pixels, 8, -2, ["torch"], {"per-image", "serial"}, None)
    with torch.inference_mode():
        one, serial = fns["per-image-torch"](), fns["serial-torch"]()
    assert torch.equal(one.keep_indices, serial.keep_indices)
    torch.testing.assert_close(one.output, serial.output, rtol=1e-4, atol=1e-4)


def test_gpu_presets_add_the_ragged_and_stage_rows():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read
    clip = bench_models.MODEL_PRESETS["clip-l-336"]
    assert clip.default_methods(cpu) == ["unpruned", "original", "flowcut", "static"]
    assert clip.default_methods(cuda) == ["unpruned", "original", "flowcut", "static", "per-image", "serial"]
    llava = bench_models.MODEL_PRESETS["llava-1.5-7b"]
    assert llava.default_methods(cuda) == ["unpruned", "original", "flowcut", "static", "per-image", "serial",
                                           "stage"]
    assert bench_models.MODEL_PRESETS["ragged-clip-l-336"].default_batch == (8,)
    assert bench_models.MODEL_PRESETS["ragged-clip-l-336"].tower == "clip-l-336"


def test_ragged_and_stage_rows_on_a_llava_sweep():
    """--methods may add the per-image / serial rows to any CLIP or LLaVA preset (as the GPU sweep does)."""
    rows = bench.run(["--preset", "llava-tiny", "--batch", "1", "2", "--target", "8", *FAST,
                      "--methods", "unpruned", "per-image", "serial", "stage", "--backends", "torch"])
    assert {(r["method"], r["batch"]) for r in rows} == {
        (m, b) for m in ("unpruned", "per-image-torch", "serial-torch", "stage-torch") for b in (1, 2)}
    for row in rows:
        if row["method"] != "unpruned":
            assert row["lm_tokens"] == 12 + 8 and row["speedup_vs_unpruned"] > 0


# 2. the language-model stage

def test_llava_tiny_has_stage_rows():
    rows = bench.run(["--preset", "llava-tiny", "--target", "8", *FAST])
    found = by_method(rows)
    for b in cpu_backends():
        stage = found[f"stage-{b}"]
        assert stage["tokens_out"] == 8 and stage["lm_tokens"] == 12 + 8
        assert stage["tokens_per_layer"][0] == 65 and stage["tokens_per_layer"][-1] == 2 * 8 + 1  # tower to 2K
        assert stage["speedup_vs_unpruned"] > 0


def test_stage_uses_the_same_weights():
    """The stage's LLaVA is assembled around the preset's own tower, projector and language model."""
    built = bench_models.build(bench_models.MODEL_PRESETS["llava-tiny"], torch.device("cpu"), torch.float32, 0, 16.0)
    llava = built.llava("torch")
    assert llava.model.vision_tower is built.tower
    assert llava.model.language_model is built.prefill.lm.model and llava.lm_head is built.prefill.lm.lm_head
    assert llava.model.multi_modal_projector.linear_1 is built.prefill.projector[0]
    assert built.llava("torch") is llava


# 3. primitives

@pytest.mark.parametrize("case", bench_kernels.PRIMITIVE_CASES["kernels-tiny"]["cpu"], ids=lambda c: c.op)
def test_compositions_compute_the_primitives(case):
    inputs = bench_kernels.primitive_inputs(case, torch.device("cpu"), torch.float32, seed=3)
    plain = bench_kernels.composition_call(case, inputs)
    for backend in cpu_backends():
        got = bench_kernels.primitive_call(case, inputs, backend)
        if case.op == "topk_select":
            kept, dropped, mask = plain
            assert torch.equal(got.kept, kept) and torch.equal(got.dropped, dropped) and torch.equal(got.mask, mask)
        elif case.op == "merge_nearest":
            torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], plain[1])
        else:
            torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)


def test_primitive_bytes_count_inputs_and_outputs():
    case = bench_kernels.PrimitiveCase("x", "attention_scores", 2, 10, heads=4, kv_heads=2, queries=3, head_dim=8,
                                       span=(1, 7))
    inputs = bench_kernels.primitive_inputs(case, torch.device("cpu"), torch.float32)
    out = bench_kernels.primitive_call(case, inputs, "torch")
    assert bench_kernels.primitive_bytes(case, inputs, out) == 4 * (2 * 4 * 3 * 8 + 2 * 2 * 10 * 8 + 2 * 6)
    case = bench_kernels.PrimitiveCase("x", "topk_select", 2, 10, keep=3)
    inputs = bench_kernels.primitive_inputs(case, torch.device("cpu"), torch.float32)
    out = bench_kernels.primitive_call(case, inputs, "torch")
    assert bench_kernels.primitive_bytes(case, inputs, out) == 4 * 20 + 8 * (6 + 14 + 3 + 3)  # the mask: on first use


def test_kernel_rows_time_every_primitive_against_its_composition():
    rows = bench.run(["--preset", "kernels-tiny", *FAST])
    primitive = [r for r in rows if r["op"] != "prune_step"]
    assert {r["op"] for r in primitive} == {"attention_scores", "text_guided_scores", "topk_select", "merge_nearest"}
    for op in {r["op"] for r in primitive}:
        variants = {r["variant"] for r in primitive if r["op"] == op}
        assert variants == {*cpu_backends(), "composition"}
    for row in primitive:
        assert row["speedup_vs_composition"] > 0 and row["bytes"] > 0 and row["ref_method"] == "composition"
        if row["variant"] == "composition":
            assert row["method"] == "composition" and row["speedup_vs_composition"] == 1.0
    cuda_ops = {c.op for c in bench_kernels.PRIMITIVE_CASES["kernels"]["cuda"]}
    assert cuda_ops == {"attention_scores", "text_guided_scores", "topk_select", "merge_nearest"}


# 4, 5. LLaVA-NeXT and Qwen2-VL

@pytest.mark.parametrize("preset, out_unpruned, out_flowcut, lm", [
    ("llava-next-tiny", 5 * 64 + 16, 16, True),  # 5 crops of 64 patches; the stock packing adds 16 newlines
    ("llava-next-crops-tiny", 5 * 64, 5 * 8, False),  # ⌊K/2⌋ per crop
    ("qwen2-vl-tower-tiny", 64, 16, False),  # 16×16 patches, 2×2 merge
    ("qwen2-vl-video-tower-tiny", 4 * 64, 16, False),  # 4 temporal patches of 16×16, K per video
    ("qwen3-vl-tower-tiny", 64, 16, False),
    ("qwen2-vl-tiny", 64, 16, True),
    ("gemma3-tower-tiny", 64, 16, False),  # 16×16 patches pooled 2×2: 64 tokens, K whole windows
    ("gemma3-tiny", 64, 16, True),  # the whole model: K soft tokens between begin- and end-of-image
    ("llava-onevision-tiny", 64 + 16 * 16 + 16, 16, True),  # base crop, 2×2 grid of 8×8 patches and 16 newlines
    ("llava-onevision-tower-tiny", 5 * 64, 5 * 8, False),  # 5 crops of 64 patches, ⌊K/2⌋ per crop
    ("vit-tower-tiny", 64, 16, False),
    ("dinov2-tower-tiny", 64, 16, False),  # CLS and 4 registers not counted
    ("internvl-tower-tiny", 64, 16, False),  # 16×16 patches pixel-shuffled 2×2: 64 tokens, K whole groups
    ("internvl3-8b-tiny", 5 * 64, 16, True),  # 5 tiles of 64 tokens; K between <img> and </img>
])
def test_scenario_presets_at_tiny_sizes(preset, out_unpruned, out_flowcut, lm, tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.run(["--preset", preset, "--batch", "1", "2", *FAST, "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    backends = cpu_backends()
    assert {(r["method"], r["batch"]) for r in rows} == {
        (m, b) for m in ["unpruned", *(f"flowcut-{x}" for x in backends)] for b in (1, 2)}
    for row in rows:
        assert row["target"] == 16 and row["preset"] == preset
        if row["method"] == "unpruned":
            assert row["tokens_out"] == out_unpruned
        else:
            assert row["tokens_out"] == out_flowcut and row["speedup_vs_unpruned"] > 0
        assert (row["lm_tokens"] is not None) == lm
        if lm:
            marks = 2 if preset.startswith(("qwen", "gemma3", "internvl")) else 0  # begin / end of image
            assert row["lm_tokens"] == 12 + row["tokens_out"] + marks
        assert row["tokens_per_layer"]


def _stock_output(name, built, pixels):
    """The stock model's output that a tower preset's unpruned method reports, computed here from its public API."""
    model = built.model
    if name.startswith(("gemma3", "internvl")):
        return model.get_image_features(pixels, return_dict=True).pooler_output
    out = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    return out if name.startswith("llava-onevision") else out[:, 1 + model.config.to_dict().get(
        "num_register_tokens", 0):]


@pytest.mark.parametrize("name", ["gemma3-tower-tiny", "llava-onevision-tower-tiny", "vit-tower-tiny",
                                  "dinov2-tower-tiny", "internvl-tower-tiny"])
def test_family_tower_presets_keep_k_and_unpruned_is_the_stock_model(name):
    s = scenarios.SCENARIOS[name]
    built = s.build("cpu", torch.float32, 0, s.sharpen)
    crops = built.extras.get("crops", 1)
    fns = built.methods(2, 16, cpu_backends(), {"unpruned", "flowcut"}, 3)
    with torch.inference_mode():
        results = {method: fn() for method, fn in fns.items()}
        stock = _stock_output(name, built, built.extras["pixels"](2, 3))
    assert torch.equal(results.pop("unpruned").output, stock)
    per_crop = 16 // 2 if crops > 1 else 16
    for method, result in results.items():
        assert result.output.shape[:2] == (2 * crops, per_crop) and torch.isfinite(result.output).all(), method
        assert result.keep_indices.shape == (2 * crops, per_crop) and result.tokens_out == crops * per_crop
        assert result.tokens_per_layer[0] > result.tokens_per_layer[-1]  # the schedule pruned
    if name.startswith("dinov2"):  # CLS + 4 registers ride along in every layer
        assert results["flowcut-torch"].tokens_per_layer[-1] == 16 + 5


def test_family_tower_presets_have_the_real_shapes():
    gemma = scenarios.gemma3_config(scenarios.SCENARIOS["gemma3-tower"])
    vision = gemma.vision_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (27, 1152, 16, 4304, 14, 896)
    assert gemma.mm_tokens_per_image == 256 and scenarios.SCENARIOS["gemma3-tower"].image == (64, 64)
    onevision = scenarios.SCENARIOS["llava-onevision-tower"]
    assert onevision.tower["image_size"] == 384 and onevision.tower["num_hidden_layers"] == 27
    assert scenarios.onevision_crops(onevision) == 5  # 768×768: the base crop + a 2×2 grid
    assert scenarios.SCENARIOS["vit-tower"].tower == scenarios.VIT_B16
    assert scenarios.SCENARIOS["dinov2-tower"].tower["num_register_tokens"] == 4
    internvl = scenarios.internvl_config(scenarios.SCENARIOS["internvl-tower"])
    vision = internvl.vision_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, *vision.patch_size,
            *vision.image_size) == (24, 1024, 16, 14, 14, 448, 448)
    assert internvl.image_seq_length == 256 and internvl.downsample_ratio == 0.5
    for name in ("gemma3-tower", "llava-onevision-tower", "vit-tower", "dinov2-tower", "internvl-tower"):
        assert scenarios.SCENARIOS[name].default_targets == (64,) and scenarios.SCENARIOS[name].cuda_only is None


def _family_inputs(name, s, config, batch, pixels):
    """What a whole-family tiny preset hands its model: (count → an image's prompt ids for ``count`` visual tokens,
    the stock model's image inputs of ``pixels`` for ``batch`` images, the inputs only the patched model takes)."""
    if name.startswith("gemma3"):
        marks = [config.boi_token_id], [config.eoi_token_id]
    elif name.startswith("internvl"):
        marks = [s.ids["start_image_token_id"]], [s.ids["end_image_token_id"]]
    else:
        marks = [], []
    image = {"pixel_values": pixels}
    patched = {}
    if name.startswith("llava-onevision"):
        image = {"pixel_values": pixels.view(batch, -1, *pixels.shape[1:]),
                 "image_sizes": torch.tensor([s.image] * batch)}
    if name.startswith("internvl"):
        patched = {"image_num_patches": torch.tensor([len(pixels) // batch] * batch)}
    return (lambda count: marks[0] + [config.image_token_id] * count + marks[1]), image, patched


@pytest.mark.parametrize("name", ["gemma3-tiny", "llava-onevision-tiny", "internvl3-8b-tiny"])
def test_whole_family_presets_run_the_stock_model_and_flowcut(name):
    """unpruned is the stock model's prefill (here from its public API), flowcut-<backend> the same call after
    flowcut(model, K): K visual tokens in the prompt; the model is left unpatched."""
    from flowcut_kernels import flowcut, remove_flowcut

    s = scenarios.SCENARIOS[name]
    built = s.build("cpu", torch.float32, 0, s.sharpen)
    model = built.model
    fns = built.methods(2, 16, ["torch"], {"unpruned", "flowcut"}, 3)
    with torch.inference_mode():
        results = {method: fn() for method, fn in fns.items()}
    assert not hasattr(model, "flowcut_config")
    config = model.config
    crops = built.extras.get("crops", 1)
    side = s.tower["image_size"]
    pixels = torch.randn(2 * crops, 3, side, side, generator=torch.Generator().manual_seed(3))
    visual_ids, image, patched = _family_inputs(name, s, config, 2, pixels)
    for method, result in results.items():
        visual = visual_ids(result.tokens_out)
        assert result.lm_tokens == 12 + len(visual)
        text = scenarios.random_prompt(12, config.get_text_config().vocab_size, "cpu", 3) % min(s.ids.values())
        text = text.clamp(min=3)
        ids = torch.cat([text[:, :7], torch.tensor([visual]), text[:, 7:]], 1).expand(2, -1)
        kwargs = {"token_type_ids": (ids == config.image_token_id).long()} if name.startswith("gemma3") else {}
        if method != "unpruned":
            flowcut(model, 16)
            kwargs.update(patched)
        with torch.inference_mode():
            want = model(input_ids=ids, **image, **kwargs).logits[:, -1:]
        remove_flowcut(model)
        torch.testing.assert_close(result.output, want, rtol=1e-4, atol=1e-5)
    assert results["flowcut-torch"].tokens_per_layer[0] > results["flowcut-torch"].tokens_per_layer[-1]
    if name.startswith("internvl"):  # the stock prompt holds every tile's tokens; the patched one K per image
        assert results["unpruned"].tokens_out == crops * config.image_seq_length == 5 * 64
        assert results["flowcut-torch"].tokens_out == 16


@pytest.mark.parametrize("name", ["internvl-tower-tiny", "internvl3-8b-tiny"])
def test_internvl_random_models_are_made_realistic(name):
    """Both InternVL presets build their model through one helper: the CLS row and position table given values
    (the stock ones start at zero), q and k (weights and biases) scaled by the preset's factor, the rest as seeded."""
    from transformers import InternVLForConditionalGeneration, InternVLModel

    s = scenarios.SCENARIOS[name]
    cls = InternVLModel if s.kind == "internvl-tower" else InternVLForConditionalGeneration
    built = s.build("cpu", torch.float32, 0, s.sharpen)
    assert type(built.model) is cls
    plain = scenarios.internvl_model(cls, s, "cpu", torch.float32, 0, 1.0)
    towers = [getattr(m, "model", m).vision_tower for m in (built.model, plain)]
    for tower in towers:
        assert tower.embeddings.cls_token.abs().min() > 0 and tower.embeddings.position_embeddings.abs().min() > 0
    for got, want in zip(towers[0].encoder.layer, towers[1].encoder.layer):
        for proj in ("q_proj", "k_proj"):
            torch.testing.assert_close(getattr(got.attention, proj).weight, s.sharpen * getattr(want.attention,
                                                                                                 proj).weight)
            torch.testing.assert_close(getattr(got.attention, proj).bias, s.sharpen * getattr(want.attention,
                                                                                               proj).bias)
        assert torch.equal(got.attention.v_proj.weight, want.attention.v_proj.weight)


def test_qwen_flop_model_counts_what_an_eager_prefill_multiplies():
    """The FLOP model against torch's FLOP counter on the tiny whole Qwen2-VL with eager attention, which computes
    the full L × L decoder scores where the model counts the causal half. Unpruned: equal but for that half;
    FlowCut: its own scoring on top (a few per cent at these tiny widths)."""
    from torch.utils.flop_counter import FlopCounterMode

    built = scenarios.SCENARIOS["qwen2-vl-tiny"].build("cpu", torch.float32, 0, 4.0)
    built.model.set_attn_implementation("eager")
    text = built.model.config.text_config
    counted = {}
    for name, fn in built.methods(1, 16, ["torch"], {"unpruned", "flowcut"}, 0).items():
        decoder = scenarios._rows_seen(fn, (built.model.model.language_model.layers, 1))[0]
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            result = fn()
        counted[name] = counter.get_total_flops() - sum(2 * n * n * text.hidden_size for n in decoder)
        assert counted[name] >= result.flops, name
        counted[name] /= result.flops
    assert counted["unpruned"] == pytest.approx(1.0, rel=1e-4)  # 5.0.0 multiplies ~2e3 more (of 6e7) somewhere
    assert counted["flowcut-torch"] < 1.05
    rows = bench.run(["--preset", "qwen2-vl-tiny", "--backends", "torch", *FAST])
    by_method = {r["method"]: r for r in rows}
    assert by_method["unpruned"]["flop_limit_vs_unpruned"] == 1.0
    flowcut = by_method["flowcut-torch"]
    assert flowcut["flop_limit_vs_unpruned"] == pytest.approx(by_method["unpruned"]["gflops"] / flowcut["gflops"])
    assert flowcut["flop_limit_vs_unpruned"] > 1


def test_cpu_scenario_has_the_2b_shapes():
    s = scenarios.SCENARIOS["qwen2-vl-2b-cpu"]
    config = scenarios.qwen_config(s)
    text = config.text_config
    assert (config.vision_config.depth, config.vision_config.embed_dim, config.vision_config.hidden_size) == (
        32, 1280, 1536)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (28, 1536, 12, 2, 8960)
    assert s.image == (24, 24) and s.default_targets == (64, 128) and s.cuda_only is None


def test_gpu_scenarios_have_the_7b_shapes():
    next7 = scenarios.SCENARIOS["llava-next-7b"]
    config = scenarios.next_config(next7)
    assert config.vision_config.image_size == 336 and config.vision_config.num_hidden_layers == 24
    assert config.text_config.hidden_size == 4096 and config.text_config.num_hidden_layers == 32
    assert config.image_grid_pinpoints == scenarios.NEXT_PINPOINTS and next7.image == (672, 672)
    assert next7.default_targets == (32, 64, 128, 160) and next7.default_batch == (1, 8)
    qwen = scenarios.qwen_config(scenarios.SCENARIOS["qwen2-vl-7b"])
    assert (qwen.vision_config.depth, qwen.vision_config.embed_dim) == (32, 1280)
    text = qwen.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (
        28, 3584, 28, 4)
    assert scenarios.SCENARIOS["qwen2-vl-7b"].image == (92, 92)  # 1288×1288 px, 2116 merged tokens
    assert scenarios.SCENARIOS["qwen2-vl-tower"].image == (32, 32)  # 448×448 px
    tower = scenarios.qwen_config(scenarios.SCENARIOS["qwen2-vl-tower"])
    assert (tower.depth, tower.embed_dim, tower.num_heads, tower.patch_size) == (32, 1280, 16, 14)
    gemma = scenarios.gemma3_config(scenarios.SCENARIOS["gemma3-4b"])
    vision, text = gemma.vision_config, gemma.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (27, 1152, 896, 14)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.vocab_size) == (34, 2560, 8, 4, 256, 262208)
    assert text.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma.mm_tokens_per_image == 256
    onevision = scenarios.onevision_config(scenarios.SCENARIOS["llava-onevision-7b"])
    vision, text = onevision.vision_config, onevision.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (27, 1152, 384, 14)
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (28, 3584, 28, 4, 18944)
    assert (onevision.vision_feature_layer, onevision.vision_feature_select_strategy) == (-1, "full")
    assert scenarios.onevision_crops(scenarios.SCENARIOS["llava-onevision-7b"]) == 5  # 768×768: base + 2×2 grid
    s = scenarios.SCENARIOS["internvl3-8b"]
    internvl = scenarios.internvl_config(s)
    vision, text = internvl.vision_config, internvl.text_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, *vision.patch_size,
            *vision.image_size) == (24, 1024, 16, 14, 14, 448, 448)
    assert (text.model_type, text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size) == ("qwen2", 28, 3584, 28, 4, 18944)
    assert (internvl.image_seq_length, internvl.downsample_ratio, internvl.image_token_id) == (256, 0.5, 151667)
    assert internvl.tie_word_embeddings is False and text.vocab_size == 151674  # InternVL3-8B's own lm_head
    assert scenarios.internvl_tiles(s) == 5 and s.image == (896, 896)  # a 2×2 grid of 448² tiles + the thumbnail
    assert s.default_targets == (64, 128, 256) and s.min_target == 5  # each tile keeps at least one group
    for name in ("gemma3-4b", "llava-onevision-7b", "internvl3-8b"):
        assert scenarios.SCENARIOS[name].cuda_only and scenarios.SCENARIOS[name].default_batch == (1, 8)


def test_help_lists_every_preset_with_a_line(capsys):
    with pytest.raises(SystemExit):
        bench.run(["--help"])
    text = capsys.readouterr().out
    for name in cli.PRESETS:
        assert any(line.strip().startswith(name + " ") and len(line.split()) > 2 for line in text.splitlines()), name


@pytest.mark.parametrize("argv, message", [
    (["--preset", "llava-next-7b"], "--preset llava-next-7b runs on CUDA only"),
    (["--preset", "qwen2-vl-7b"], "--preset qwen2-vl-7b runs on CUDA only"),
    (["--preset", "gemma3-4b"], "--preset gemma3-4b runs on CUDA only"),
    (["--preset", "llava-onevision-7b"], "--preset llava-onevision-7b runs on CUDA only"),
    (["--preset", "internvl3-8b"], "--preset internvl3-8b runs on CUDA only: InternVL3-8B needs 16 GB"),
    (["--preset", "internvl3-8b-tiny", "--target", "4"], "at least 1 a tile) must be in [5, 319]"),
    (["--preset", "internvl3-8b-tiny", "--feature-layer", "-1"], "it measures the model's own feature layer"),
    (["--preset", "qwen2-vl-tiny", "--feature-layer", "-2"], "it measures the model's own feature layer"),
    (["--preset", "llava-onevision-tiny", "--target", "32"], "the LM stage to K) must be in [2, 31]"),
    (["--preset", "llava-next-crops-tiny", "--feature-layer", "-2"], "--feature-layer does not apply"),
    (["--preset", "qwen2-vl-tower-tiny", "--methods", "original"], "--methods original does not apply"),
    (["--preset", "clip-tiny", "--methods", "stage"], "--methods stage does not apply"),
    (["--preset", "llava-next-crops-tiny", "--target", "128"], "target 128 is out of range"),
    (["--preset", "llava-next-tiny", "--target", "1"], "target 1 is out of range"),
    (["--preset", "qwen2-vl-tower-tiny", "--target", "64"], "target 64 is out of range"),
    (["--preset", "gemma3-tower-tiny", "--target", "64"], "pooling windows kept per image"),
    (["--preset", "vit-tower-tiny", "--feature-layer", "-2"], "--feature-layer does not apply"),
    (["--preset", "llava-tiny", "--target", "40"], "too large for the stage rows"),
    (["--preset", "ragged-tiny", "--batch", "0"], "--batch 0"),
    (["--preset", "kernels-tiny", "--methods", "serial"], "--methods does not apply"),
])
def test_new_bad_arguments_are_usage_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench_models, "build", lambda *a, **k: pytest.fail("built a model for bad arguments"))
    monkeypatch.setattr(scenarios.Scenario, "build", lambda *a, **k: pytest.fail("built a model for bad arguments"))
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ragged_bars_write_the_speedup_over_serial():
    pytest.importorskip("matplotlib")
    rows = bench.run(["--preset", "ragged-tiny", "--target", "8", *FAST, "--repeats", "2", "--backends", "torch"])
    fig = plots.figure(rows, "title", "cpu · float32 · 2026-01-02")
    texts = " | ".join(t.get_text() for t in fig.axes[0].texts)
    one = by_method(rows)["per-image-torch"]
    assert f"{one['speedup_vs_serial']:.2f}× vs serial-torch" in texts
    assert plots.style("per-image-torch") != plots.style("serial-torch")

"""flowcut-bench --model: the user's own LLaVA / CLIP / SigLIP checkpoint, saved here by save_pretrained."""

import json
import logging
from contextlib import contextmanager

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig

from flowcut_kernels import bench, flowcut
from flowcut_kernels.bench.random_models import PRESETS, random_clip_vision, random_pixels, random_siglip_vision
from tiny.llava import random_llava
from flowcut_kernels.bench import checkpoint
from flowcut_kernels.bench import presets as bench_models

FAST = ["--device", "cpu", "--repeats", "1", "--warmup", "1", "--no-progress", "--target", "8"]
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


def clip_model(seed=0):
    """A CLIPModel (vision and text towers), as openai/clip-vit-large-patch14-336 is stored."""
    torch.manual_seed(seed)
    vision = {k: v for k, v in PRESETS["tiny"].items() if k != "projection_dim"}
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=TINY_TEXT, projection_dim=16)).eval()


@contextmanager
def logged(name):
    """The records the logger ``name`` lets through while the block runs."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


BUILDERS = {
    "clip-projection": lambda: random_clip_vision("tiny", with_projection=True),
    "clip-model": clip_model,
    "siglip": lambda: random_siglip_vision("tiny"),
    "llava-clip": lambda: random_llava("clip"),
    "llava-siglip": lambda: random_llava("siglip"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> folder of a seeded tiny checkpoint written by save_pretrained."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name, build in BUILDERS.items():
        build().save_pretrained(root / name)
    return {name: str(root / name) for name in BUILDERS}


@pytest.mark.parametrize("name, model_class, methods, tokens_in", [
    ("clip-projection", "CLIPVisionModelWithProjection", {"unpruned", "original"}, 65),
    ("clip-model", "CLIPVisionModel", {"unpruned", "original"}, 65),
    ("siglip", "SiglipVisionModel", {"unpruned"}, 64),
    ("llava-clip", "LlavaForConditionalGeneration", {"unpruned", "original"}, 65),
    ("llava-siglip", "LlavaForConditionalGeneration", {"unpruned"}, 64),
])
def test_checkpoint_is_measured_like_a_preset(saved, tmp_path, capsys, name, model_class, methods, tokens_in):
    path = tmp_path / "rows.json"
    with logged("transformers") as records:
        rows = bench.run(["--model", saved[name], *FAST, "--json", str(path)])
    printed = capsys.readouterr().out
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]  # a CLIPModel's text tower: not reported
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    backends = bench.kernels.measurable_backends("cpu")[0]
    assert {r["method"] for r in rows} == methods | {f"{f}-{b}" for f in ("flowcut", "static") for b in backends}
    assert f"loading {saved[name]} ({model_class}" in printed and "from_pretrained" in printed
    if "original" not in methods:
        assert "original: skipped — the original-style baseline (flowcut_kernels/bench/original.py) re-implements " \
            "FlowCut for CLIP towers only" in printed
    llava = name.startswith("llava")
    for row in rows:
        assert row["preset"] == saved[name] and row["model_class"] == model_class and row["sharpen"] is None
        assert row["tokens_per_layer"][0] == tokens_in and row["feature_layer"] == -2
        unpruned = row["method"] == "unpruned"
        # CLIP (and LLaVA's "default" strategy) drop the CLS row; SigLIP has none (LLaVA-SigLIP: "full")
        assert row["tokens_out"] == (64 if unpruned else 8)
        assert row["lm_tokens"] == ((bench_models.PROMPT_TOKENS + row["tokens_out"]) if llava else None)


def test_llava_checkpoint_times_the_stock_prefill_and_the_patched_one(saved):
    """unpruned gives the stock model's logits on the prompt with 64 image tokens; flowcut-torch those of
    the FlowCut-patched model with 8 (one image: the patched LLaVA prunes each image on its own)."""
    found = checkpoint.inspect(saved["llava-clip"])
    built = checkpoint.load(found, torch.device("cpu"), torch.float32, seed=0)
    model, prompt = built.prefill.lm, built.prefill.prompt_ids
    assert int((prompt == model.config.image_token_id).sum()) == 0  # text tokens only

    def input_ids(image_tokens, batch):
        image = torch.full((1, image_tokens), model.config.image_token_id)
        pos = bench_models.IMAGE_POSITION
        return torch.cat([prompt[:, :pos], image, prompt[:, pos:]], dim=1).expand(batch, -1)

    with torch.inference_mode():
        pixels = random_pixels(built.tower, 2, seed=0)
        unpruned = bench_models.methods(built, pixels, 8, -2, [], {"unpruned"}, False)["unpruned"]()
        stock = model(input_ids=input_ids(64, 2), pixel_values=pixels, logits_to_keep=1).logits
        torch.testing.assert_close(unpruned.output, stock)
        pixels = pixels[:1]
        pruned = bench_models.methods(built, pixels, 8, -2, ["torch"], {"flowcut"}, False)["flowcut-torch"]()
        flowcut(model, 8, backend="torch")
        patched = model(input_ids=input_ids(8, 1), pixel_values=pixels, logits_to_keep=1).logits
        torch.testing.assert_close(pruned.output, patched)


def cached_repo(cache, monkeypatch, repo_id):
    """The snapshot folder of ``repo_id`` in a Hugging Face cache made at ``cache`` (and used from now on)."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / commit


def test_hub_id_is_read_from_the_local_cache(tmp_path, monkeypatch, capsys):
    """A name that is no folder is a Hub id, looked up in the Hugging Face cache only (no download)."""
    random_siglip_vision("tiny").save_pretrained(cached_repo(tmp_path, monkeypatch, "someone/tiny-siglip"))
    rows = bench.run(["--model", "someone/tiny-siglip", *FAST, "--methods", "unpruned", "flowcut",
                      "--backends", "torch"])
    assert "from the local Hugging Face cache (local_files_only=True)" in capsys.readouterr().out
    assert [r["method"] for r in rows] == ["unpruned", "flowcut-torch"]


def test_unreadable_cached_config_is_a_usage_error(tmp_path, monkeypatch, capsys):
    snapshot = cached_repo(tmp_path, monkeypatch, "someone/odd")
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--model", "someone/odd", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--model someone/odd: no readable model configuration in the Hugging Face cache" in capsys.readouterr().err


def write_file(path):
    path.write_bytes(b"")
    return str(path)


def write_config(folder, config):
    """A checkpoint folder holding only config.json: enough for every check made before loading."""
    config.save_pretrained(folder)
    return str(folder)


def bad_llava(**fields):
    vision = {k: v for k, v in PRESETS["tiny"].items() if k != "projection_dim"}
    return LlavaConfig(**{"vision_config": {"model_type": "clip_vision_model", **vision},
                          "text_config": {"model_type": "llama", **TINY_TEXT}, **fields})


@pytest.mark.parametrize("make, argv, message", [
    (lambda tmp: str(tmp / "missing" / "model"), [], "no such folder"),
    (lambda tmp: write_file(tmp / "model.safetensors"), [], "this is a file"),
    (lambda tmp: str(tmp), [], "holds no readable model configuration (config.json)"),
    (lambda tmp: "nobody-here/no-such-model", [], "not in the local Hugging Face cache"),
    (lambda tmp: write_config(tmp, LlamaConfig(architectures=["LlamaForCausalLM"], **TINY_TEXT)), [],
     "a 'llama' checkpoint (LlamaForCausalLM), which flowcut-bench cannot measure"),
    (lambda tmp: write_config(tmp, bad_llava(vision_config={"model_type": "pixtral"})), [],
     "a LLaVA whose vision tower is a 'pixtral'"),
    (lambda tmp: write_config(tmp, bad_llava(vision_feature_layer=[-2, -1])), [], "selects several feature layers"),
    (lambda tmp: write_config(tmp, bad_llava(vision_feature_select_strategy="full")), [],
     "config.vision_feature_select_strategy='full'"),
    (lambda tmp: write_config(tmp, bad_llava()), ["--feature-layer", "-3"],
     "--feature-layer -3 differs from the LLaVA checkpoint's config.vision_feature_layer (-2)"),
    (lambda tmp: write_config(tmp, bad_llava()), ["--target", "64"],
     "--target=64 is out of range"),
    (lambda tmp: write_config(tmp, CLIPVisionConfig(**PRESETS["tiny"])), ["--feature-layer", "0"],
     "feature_layer=0 is out of range"),
    (lambda tmp: write_config(tmp, bad_llava()), ["--sharpen", "4"], "--sharpen does not apply to --model"),
    (lambda tmp: write_config(tmp, bad_llava()), ["--preset", "clip-tiny"],
     "argument --preset: not allowed with argument --model"),
])
def test_bad_checkpoints_are_usage_errors(tmp_path, monkeypatch, capsys, make, argv, message):
    """Found from the configuration alone, before any weight is loaded; argparse usage errors (exit 2)."""
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("loaded a checkpoint for bad arguments"))
    source = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--device", "cpu", "--model", source, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and (source in err or argv[0] in err)


def test_sharpen_is_refused_by_kernel_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.run(["--preset", "kernels-tiny", "--device", "cpu", "--sharpen", "4"])
    assert exit_info.value.code == 2 and "--sharpen does not apply to --preset kernels-tiny" in capsys.readouterr().err

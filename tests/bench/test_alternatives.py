"""The other methods of the bench — visionzip, fastv, downsample — beside unpruned and flowcut at the same target,
and the time to first token of the LLaVA presets (the prefill, then one decode step)."""

import json

import pytest
import torch

from flowcut_kernels import bench
from flowcut_kernels.bench.random_models import random_clip_vision, random_pixels
from flowcut_kernels.bench import presets as bench_models
from flowcut_kernels.bench import report
from flowcut_kernels.bench.cli import METHOD_NOTES
from flowcut_kernels.models.attention import capturing
from flowcut_kernels.models.registry import find_tower
from flowcut_kernels.recipes.visionzip import visionzip

FAST = ["--device", "cpu", "--repeats", "1", "--warmup", "1", "--no-progress", "--backends", "torch"]
ALL = ["unpruned", "flowcut", "visionzip", "fastv", "downsample"]


def test_tower_preset_prints_one_row_per_method(tmp_path, capsys):
    path = tmp_path / "rows.json"
    rows = bench.run(["--preset", "clip-tiny", "--methods", *ALL, *FAST, "--json", str(path)])
    printed = capsys.readouterr().out
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["unpruned", "visionzip", "fastv", "downsample", "flowcut-torch"]
    for name, row in by_method.items():
        assert row["measured"] == "vision" and row["target"] == 8
        assert row["images_per_s"] == pytest.approx(1e3 / row["median_ms"])
        assert any(line.startswith(name + " ") for line in printed.splitlines())
    assert "time: the vision tower's features" in printed and "images/s" in printed
    assert by_method["visionzip"]["tokens_out"] == 8
    assert by_method["visionzip"]["settings"] == dict(dominant=7, contextual=1, feature_layer=-2, backend="auto")
    assert by_method["fastv"]["tokens_out"] == 64  # FastV prunes in a language model: the tower runs as is
    assert "FastV prunes inside a language model" in by_method["fastv"]["settings"]["note"]
    assert by_method["downsample"]["tokens_out"] == 9  # round(√8) = 3: a 3×3 grid
    assert by_method["downsample"]["tokens_per_layer"] == [10] * 6
    assert by_method["downsample"]["settings"]["image_size"] == 12  # 3 patches of 4 px
    assert by_method["flowcut-torch"]["settings"] == dict(target_num=8, backend="torch", schedule="adaptive")
    assert json.loads(path.read_text())[1]["settings"]["contextual"] == 1


def test_llava_preset_times_the_first_token_of_every_method(capsys):
    rows = bench.run(["--preset", "llava-tiny", "--batch", "1", "2", "--methods", *ALL, "stage", *FAST])
    printed = capsys.readouterr().out
    assert {r["method"] for r in rows} == {"unpruned", "visionzip", "fastv", "downsample", "flowcut-torch",
                                           "stage-torch"}
    for row in rows:
        assert row["measured"] == "ttft"
        assert row["lm_tokens"] == 12 + row["tokens_out"]
        assert row["tokens_out"] == {"unpruned": 64, "downsample": 9}.get(row["method"], 8)
    fastv = next(r for r in rows if r["method"] == "fastv")
    assert fastv["settings"] == dict(keep=8, layer=1, prompt_before=12 + 64, backend="auto")
    assert "TTFT ms" in printed and "time: time to first token" in printed


@pytest.fixture(scope="module")
def llava_tiny():
    return bench_models.build(bench_models.MODEL_PRESETS["llava-tiny"], torch.device("cpu"), torch.float32, 0, 16.0)


def run_method(built, name, target, batch=2):
    pixels = random_pixels(built.tower, batch, seed=4)
    with torch.inference_mode():
        return bench_models.methods(built, pixels, target, -2, ["torch"], {name}, False)[name]()


def test_first_token_is_a_decode_step_on_the_prefill_cache(llava_tiny):
    """unpruned: the prefill's logits, then the logits of the greedy next token with the whole prompt before it."""
    prefill = llava_tiny.prefill
    got = run_method(llava_tiny, "unpruned", 8)
    pixels = random_pixels(llava_tiny.tower, 2, seed=4)
    with torch.inference_mode():
        features = llava_tiny.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        embeds = prefill.embeds(features)
        full = prefill.lm(inputs_embeds=embeds).logits
        token = full[:, -1:].argmax(-1)
        again = prefill.lm(inputs_embeds=torch.cat([embeds, prefill.lm.get_input_embeddings()(token)], 1)).logits
    torch.testing.assert_close(got.output, full[:, -1:])
    torch.testing.assert_close(got.first_step, again[:, -1:], rtol=1e-4, atol=1e-4)


def test_fastv_keeping_every_image_token_is_the_unpruned_model(llava_tiny):
    """With keep = all 64 image tokens FastV drops nothing: its prefill and its decode step on the cache it filled
    (full layers before the prune, the kept rows after) are the unpruned ones."""
    unpruned = run_method(llava_tiny, "unpruned", 8)
    fastv = run_method(llava_tiny, "fastv", 64)
    torch.testing.assert_close(fastv.output, unpruned.output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fastv.first_step, unpruned.first_step, rtol=1e-4, atol=1e-4)
    pruned = run_method(llava_tiny, "fastv", 8)
    assert pruned.lm_tokens == 12 + 8 and not torch.allclose(pruned.first_step, unpruned.first_step)


def test_visionzip_row_is_the_recipe_on_the_feature_layer():
    tower = random_clip_vision("tiny", seed=0, sharpen=16.0)
    built = bench_models.Built("clip-tiny", tower, None, True, 0.0)
    got = run_method(built, "visionzip", 12)
    pixels = random_pixels(tower, 2, seed=4)
    with torch.inference_mode(), capturing(tower.config) as seen:
        seen.watch = find_tower(tower).layers[4].self_attn  # layer -2 of 6
        hidden = tower(pixels, output_hidden_states=True).hidden_states[5]
        q, k, _, scale = seen.seen
        want = visionzip(hidden, q, k, scale=scale, dominant=10, contextual=2)
    assert bench_models.visionzip_split(12) == (10, 2) and bench_models.visionzip_split(64) == (54, 10)
    torch.testing.assert_close(got.output, want)


def test_downsample_row_is_the_stock_tower_on_the_resized_image():
    tower = random_clip_vision("tiny", seed=0, sharpen=16.0)
    built = bench_models.Built("clip-tiny", tower, None, True, 0.0)
    got = run_method(built, "downsample", 16)
    pixels = random_pixels(tower, 2, seed=4)
    small = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True)
    with torch.inference_mode():
        want = tower(small, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][:, 1:]
    assert got.tokens_out == 16 and got.settings["grid"] == 4
    torch.testing.assert_close(got.output, want)


def test_visionzip_needs_two_tokens(capsys):
    with pytest.raises(SystemExit):
        bench.run(["--preset", "clip-tiny", "--methods", "visionzip", "--target", "1", *FAST])
    assert "--target 1 is too small for visionzip" in capsys.readouterr().err


def test_table_and_notes_name_the_new_columns_and_methods():
    row = dict(method="downsample", batch=4, target=8, tokens_out=9, median_ms=20.0, p20_ms=19.0, p80_ms=21.0,
               images_per_s=200.0, peak_mem_mb=None, measured="ttft")
    head, line = report.model_table([row])
    assert head[4] == "TTFT ms" and head[7] == "images/s" and line[7] == "200.0"
    assert all(f"`{name}`" in METHOD_NOTES[0] for name in ("visionzip", "fastv", "downsample"))

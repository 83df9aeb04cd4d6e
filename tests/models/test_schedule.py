"""The static schedule (counts fixed in advance) and the host reads of each schedule.

Static: no host read during a pass, ``torch.compile(fullgraph=True)`` of encode and of patched towers equal to eager,
one compile per input shape; bad schedules refused with the model unchanged. Adaptive: at most one host read per prune
step that is not the last, for the batch rule and for per-image schedules.
"""

import copy
import dataclasses

import pytest
import torch
from host_reads import HostReads

from flowcut_kernels import FlowCutInputError, StaticSchedule, calibrate_schedule, encode, flowcut
from flowcut_kernels.bench.random_models import random_pixels, random_siglip_vision
from tiny.llava import random_llava, tiny_llava_processor
from tiny.llava_next import random_llava_next
from tiny.qwen import random_qwen2_vl
from flowcut_kernels.models import llava_next, qwen2_vl  # noqa: F401 - their patches refuse a schedule

TARGET = 8


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def calibrated(model, target=TARGET, images=4, **kwargs):
    pixels = random_pixels(getattr(getattr(model, "model", None), "vision_tower", model), images, seed=1)
    return calibrate_schedule(model, pixels, target, **kwargs)


def test_calibration_is_the_median_of_the_adaptive_counts_made_non_increasing(tiny_clip):
    model = tiny_clip(seed=3)
    pixels = random_pixels(model, 5, seed=1)
    schedule = calibrate_schedule(model, pixels, TARGET)
    adaptive = torch.tensor(encode(model, pixels, TARGET, schedule="per_image").tokens_per_layer) - 1
    median = adaptive.median(dim=0).values
    expected = [min(median[: i + 1].min().item(), 64) for i in range(len(median))]
    expected[-1] = TARGET
    assert list(schedule.counts) == expected
    assert schedule.counts[0] == 64 and schedule.tower == ("CLIPVisionConfig", 6, 32) and schedule.images == 5


def test_json_round_trip(tiny_clip):
    schedule = calibrated(tiny_clip())
    assert StaticSchedule.from_json(schedule.to_json()) == schedule
    with pytest.raises(FlowCutInputError, match="StaticSchedule's JSON"):
        StaticSchedule.from_json('{"counts": [64, 8]}')


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_static_encode_reads_nothing_and_follows_the_counts(tower, tiny_clip):
    model = tiny_clip() if tower == "clip" else random_siglip_vision("tiny", seed=0, sharpen=8.0)
    schedule = calibrated(model)
    pixels = random_pixels(model, 3, seed=7)
    with HostReads() as reads:
        out = encode(model, pixels, TARGET, schedule=schedule)
    assert not reads.reads
    relay = int(tower == "clip")
    assert [t - relay for t in out.tokens_per_layer] == list(schedule.counts)
    assert out.keep_indices.shape == (3, TARGET)
    assert bool((out.keep_indices.diff(dim=1) > 0).all())


def test_static_with_the_adaptive_counts_equals_adaptive(tiny_clip):
    """Scores, accumulation and selection are FlowCut's: given one image's own adaptive counts, the static pass keeps
    exactly the adaptive pass's tokens and features."""
    model = tiny_clip(seed=2)
    pixels = random_pixels(model, 1, seed=4)
    adaptive = encode(model, pixels, TARGET)
    schedule = calibrate_schedule(model, pixels, TARGET)  # one image: its own counts
    static = encode(model, pixels, TARGET, schedule=schedule)
    assert torch.equal(static.keep_indices, adaptive.keep_indices)
    torch.testing.assert_close(static.features, adaptive.features, rtol=0, atol=0)


def _compiles_once(fn, *inputs):
    """Run ``fn`` compiled (fullgraph, static shapes) on each input; returns the outputs and the frames compiled."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    outs = [compiled(x) for x in inputs]
    return outs, counters["stats"]["unique_graphs"]


def test_fullgraph_compile_of_encode_equals_eager_and_compiles_once(tiny_clip):
    model = tiny_clip()
    schedule = calibrated(model)
    a, b = (random_pixels(model, 2, seed=s) for s in (5, 6))
    outs, frames = _compiles_once(lambda x: encode(model, x, TARGET, schedule=schedule), a, b)
    assert frames == 1  # the second batch of the same shape reuses the graph
    for x, out in zip((a, b), outs):
        eager = encode(model, x, TARGET, schedule=schedule)
        assert torch.equal(out.keep_indices, eager.keep_indices)
        torch.testing.assert_close(out.features, eager.features, rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_of_encode_after_a_stock_forward(tiny_clip):
    """A stock forward with hidden states first (as LLaVA calls its tower) installs transformers' persistent
    output-capturing hooks (newer releases); the compiled encode still traces whole and matches eager."""
    model = tiny_clip()
    schedule = calibrated(model)
    pixels = random_pixels(model, 2, seed=5)
    stock = model(pixel_values=pixels, output_hidden_states=True)
    (out,), frames = _compiles_once(lambda x: encode(model, x, TARGET, schedule=schedule), pixels)
    eager = encode(model, pixels, TARGET, schedule=schedule)
    assert frames == 1 and torch.equal(out.keep_indices, eager.keep_indices)
    torch.testing.assert_close(out.features, eager.features, rtol=1e-5, atol=1e-5)
    again = model(pixel_values=pixels, output_hidden_states=True)  # the stock capture still works after
    assert len(again.hidden_states) == len(stock.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(again.hidden_states, stock.hidden_states))


def test_fullgraph_compile_of_patched_tower_and_llava_features(tiny_clip):
    tower = tiny_clip()
    flowcut(tower, TARGET, schedule=calibrated(tower))
    pixels = random_pixels(tower, 2, seed=5)
    (out,), _ = _compiles_once(lambda x: tower(pixel_values=x), pixels)
    eager = tower(pixel_values=pixels)
    assert torch.equal(out.keep_indices, eager.keep_indices)
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state, rtol=1e-5, atol=1e-5)

    model = random_llava(seed=0)
    flowcut(model, TARGET, schedule=calibrated(model))
    pixels = random_pixels(model.model.vision_tower, 2, seed=5)
    with HostReads() as reads:
        eager = model.model.get_image_features(pixel_values=pixels)
    assert not reads.reads
    (out,), _ = _compiles_once(lambda x: model.model.get_image_features(pixel_values=x), pixels)
    assert torch.equal(out.keep_indices, eager.keep_indices)
    torch.testing.assert_close(torch.stack(out.pooler_output), torch.stack(eager.pooler_output), rtol=1e-5, atol=1e-5)


def test_llava_generates_with_a_static_schedule():
    model = random_llava(seed=0)
    processor = tiny_llava_processor(model)
    for stage in (False, True):
        schedule = calibrated(model, target=2 * TARGET if stage else TARGET)
        flowcut(model, TARGET, processor=processor, llm_stage=stage, schedule=schedule)
        batch = processor(text=["USER: <image> w1 ASSISTANT:"], images=[torch.zeros(3, 32, 32)], return_tensors="pt")
        assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 2


def _bad(schedule, **changes):
    fields = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}
    return {**fields, **changes}


def test_bad_schedules_are_refused_and_the_model_unchanged(tiny_clip):
    model = tiny_clip()
    good = calibrated(model)
    counts = list(good.counts)
    for fields, match in [
        (_bad(good, counts=tuple(counts[:-1])), "counts has 5 entries"),
        (_bad(good, counts=(64, 40, 50, 50, 30, 8)), "must not rise"),
        (_bad(good, counts=(64,) * 6), "must end below"),
    ]:
        with pytest.raises(FlowCutInputError, match=match):
            StaticSchedule(**fields)
    before = dict(vars(model))
    siglip = random_siglip_vision("tiny", seed=0)
    for schedule, target, match in [
        (good, TARGET + 1, "ends at 8 tokens, not target_num=9"),
        (calibrated(siglip), TARGET, "calibrated on a tower of SiglipVisionConfig"),
        (calibrated(model, feature_layer=-2), TARGET, "layers 0 … 4"),
        ("static", TARGET, "must be a flowcut_kernels.StaticSchedule"),
    ]:
        with pytest.raises(FlowCutInputError, match=match):
            flowcut(model, target, schedule=schedule)
        assert vars(model) == before
        with pytest.raises(FlowCutInputError, match=match if schedule != "static" else "not one of"):
            encode(model, random_pixels(model, 1), target, schedule=schedule)
    for other in (random_llava_next(seed=0), random_qwen2_vl(seed=0)):
        state = copy.copy(vars(other))
        with pytest.raises(FlowCutInputError, match="static schedule is supported for CLIP/SigLIP towers and LLaVA"):
            flowcut(other, TARGET, schedule=good)
        assert vars(other) == state


@pytest.mark.parametrize("schedule", ["batch", "per_image"])
def test_adaptive_reads_once_per_prune_step_before_the_last(schedule, tiny_clip):
    model = tiny_clip()
    pixels = random_pixels(model, 3, seed=2)
    with HostReads() as reads:
        out = encode(model, pixels, TARGET, schedule=schedule, backend="native" if "native" in
                     __import__("flowcut_kernels").available_backends("cpu") else "torch")
    tokens = out.tokens_per_layer if schedule == "batch" else out.tokens_per_layer[0]
    layers = len(tokens) - 1  # the run layers before the feature layer
    prune_steps = sum(1 for i in range(layers) if (layers - i - 1) % 2 == 0)
    assert len(reads) <= prune_steps - 1, reads.reads
    assert len(reads) >= 1  # the adaptive schedule does read: the counter sees it

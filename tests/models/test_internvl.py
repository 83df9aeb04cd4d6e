"""flowcut() on HF InternVL: the recipe against a float64 oracle (tests/oracle/internvl.py; with the language-model
stage, tests/oracle/lm_stage.py), whole pixel-shuffle groups, tiles sharing one schedule, generate, per instance and
reversible, bad inputs.

Tiny random models (tests/tiny/internvl.py: an InternViT of 8 × 8 patches and a CLS row, 6 layers, q/k RMS-normed and
sharpened, pixel-shuffled 2 × 2 into 16 tokens a tile; a 2-layer Llama decoder). The processor crops an image into up
to 4 tiles and a thumbnail: a 32 × 64 image is 3 tiles, a 40 × 40 one tile.
"""

import copy

import pytest
import torch
from oracle.internvl import naive_image, naive_logits
from oracle.lm_stage import naive_lm_stage
from tiny.internvl import END, IMAGE, START, TILE_TOKENS, random_internvl, tiny_internvl_processor
from vlm_cases import (
    assert_bfloat16_finite, check_generate_batched, check_remove_gives_back, check_shared_processor_refused,
    check_stock_placeholders_refused, random_images, refused,
)

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut
from flowcut_kernels.models.registry import FlowCutConfig

pytest.importorskip("PIL", reason="transformers' image processors need Pillow")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K = 5
SIZES = [(32, 64), (40, 40), (64, 32)]  # 3, 1 and 3 tiles
SINGLE = ["w1 <IMG_CONTEXT> w2 w3"]
PAIR = ["w1 w2 w3 w4 <IMG_CONTEXT> w5 w6 w7", "w8 <IMG_CONTEXT> w9"]
TWO = ["w1 <IMG_CONTEXT> w2 <IMG_CONTEXT> w3 w4", "w5 <IMG_CONTEXT> w6"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def nested(prompts, sizes=SIZES):
    """The processor's images argument: one list per prompt, the images of ``sizes`` in turn (seeded)."""
    flat = iter(random_images(sizes))
    return [[next(flat) for _ in range(p.count("<IMG_CONTEXT>"))] for p in prompts]


def inputs(processor, prompts, sizes=SIZES, **kwargs):
    """The processor's tensors, with ``image_num_patches`` (each image's tiles) computed here where the release's
    processor does not add it (5.0)."""
    images = nested(prompts, sizes)
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt", **kwargs)
    if "image_num_patches" not in batch and "pixel_values" in batch:
        flat = [image for row in images for image in row]
        batch["image_num_patches"] = torch.as_tensor(processor.image_processor(flat)["num_patches"])
    return batch


def patched(target=K, llm_stage=None, **kwargs):
    model = random_internvl(**kwargs)
    processor = tiny_internvl_processor(model)
    flowcut(model, target, processor=processor, llm_stage=llm_stage)
    return model, processor


def singles(processor, prompts):
    """Each prompt alone with its images (those :func:`inputs` gives the batch)."""
    images = iter(random_images(SIZES))
    out = []
    for prompt in prompts:
        mine = [next(images) for _ in range(prompt.count("<IMG_CONTEXT>"))]
        single = processor(text=[prompt], images=[mine], return_tensors="pt")
        if "image_num_patches" not in single:  # 5.0
            single["image_num_patches"] = torch.as_tensor(processor.image_processor(mine)["num_patches"])
        out.append(single)
    return out


def runs(batch):
    """The lengths of the runs of placeholders, row by row: one per image."""
    out = []
    for row in torch.as_tensor(batch["input_ids"]).tolist():
        text = "".join("x" if t == IMAGE else " " for t in row)
        out += [len(r) for r in text.split()]
    return out


# --- the recipe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 2e-3)], ids=["float64", "float32"])
@pytest.mark.parametrize("prompts", [SINGLE, PAIR, TWO], ids=["single", "left-padded pair", "two images"])
def test_prefill_equals_oracle(prompts, dtype, rtol):
    """Kept (tile, group) pairs exact; logits to rtol of their largest."""
    model, processor = patched(dtype=dtype)
    batch = inputs(processor, prompts)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    mask = batch["attention_mask"]
    assert len(prompts) == 1 or (mask == 0).any()
    tiles = batch["image_num_patches"].tolist()
    assert max(tiles) == 3
    expected, kept = naive_logits(model, batch["input_ids"], mask, batch["pixel_values"], tiles, K)
    features = model.model.get_image_features(batch["pixel_values"], image_num_patches=tiles)
    for got, want in zip(features.keep_indices, kept):
        assert torch.equal(got, want)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(**batch, position_ids=positions).logits[:, -1].double()
    assert (logits - expected).abs().max() <= rtol * expected.abs().max()


def test_unpruned_groups_equal_stock_and_kept_tokens_are_whole_groups():
    """At K = every group of a one-tile image nothing is pruned: the group reorder, the scatter back, the stock pixel
    shuffle and projector give the stock tokens; pruned, every kept token is one whole group of the last layer's
    patches, pixel-shuffled (its 4 patches in raster order) and projected. (float64: the reorder changes the
    attention's summation order.)"""
    model, processor = patched(dtype=torch.float64)
    pixels = inputs(processor, PAIR, sizes=[(40, 40), (48, 40)])["pixel_values"].double()
    assert len(pixels) == 2
    stock = copy.deepcopy(model)
    remove_flowcut(stock)
    model.model.flowcut_config = FlowCutConfig(TILE_TOKENS, -1, "auto")
    everything = model.model.get_image_features(pixels)
    assert torch.equal(everything.keep_indices[..., 1], torch.arange(TILE_TOKENS).expand(2, -1))
    assert torch.allclose(everything.pooler_output, stock.model.get_image_features(pixels).pooler_output,
                          rtol=1e-9, atol=1e-12)
    model.model.flowcut_config = FlowCutConfig(K, -1, "auto")
    out = model.model.get_image_features(pixels)
    assert out.pooler_output.shape == (2, K, 32)
    for tokens, last in zip(out.pooler_output, out.last_hidden_state):
        assert last.shape == (1 + 4 * K, 32)
        groups = last[1:].view(K, 4 * 32)  # each kept group's 4 patches, concatenated
        assert torch.allclose(tokens, model.model.multi_modal_projector(groups), rtol=1e-9, atol=1e-12)
    assert all(t[0] == 65 and t[-1] == 1 + 4 * K for t in out.tokens_per_layer)


def test_tiles_of_an_image_share_one_schedule():
    """The tiles of a 3-tile image keep K // 3 groups (the thumbnail and the tile before it one more, K % 3 = 2) and
    drop the same number of groups at every step; its tokens do not depend on the other images of the call."""
    model, processor = patched(dtype=torch.float64)
    batch = inputs(processor, TWO)
    pixels, tiles = batch["pixel_values"], batch["image_num_patches"].tolist()
    assert tiles == [3, 1, 3]
    out = model.model.get_image_features(pixels, image_num_patches=tiles)
    assert out.keep_indices[0, :, 0].tolist() == [0, 1, 1, 2, 2]
    first = out.tokens_per_layer[:3]
    assert [t[-1] for t in first] == [1 + 4, 1 + 8, 1 + 8]
    drops = {tuple(a - b for a, b in zip(t[:-1], t[1:])) for t in first}
    assert len({d[:-1] for d in drops}) == 1  # the same drops until the last step
    alone = model.model.get_image_features(pixels[:3], image_num_patches=[3])
    assert torch.equal(alone.keep_indices[0], out.keep_indices[0])
    assert torch.allclose(alone.pooler_output[0], out.pooler_output[0], rtol=1e-9, atol=1e-12)
    assert len({tuple(t) for t in out.tokens_per_layer}) > 2  # the schedules differ: a real per-image test


def test_one_host_read_per_prune_step():
    """Three images of 3, 1 and 3 tiles: Hn is read once per prune step before the last, not once per image."""
    from host_reads import HostReads

    model, processor = patched()
    batch = inputs(processor, TWO)
    tiles = batch["image_num_patches"].tolist()
    with HostReads() as reads:
        out = model.model.get_image_features(batch["pixel_values"], image_num_patches=tiles)
    layers = len(out.tokens_per_layer[0])
    steps = sum(1 for i in range(layers - 1) if (layers - 2 - i) % 2 == 0 and layers - 2 - i > 0)
    assert steps and len(reads.reads) == steps, reads.reads


def test_k_tokens_per_image_reach_the_language_model():
    model, processor = patched()
    batch = inputs(processor, TWO)
    assert runs(batch) == [K, K, K]
    features = model.model.get_image_features(batch["pixel_values"], image_num_patches=batch["image_num_patches"])
    assert features.pooler_output.shape == (3, K, 32)
    out = model.model(**batch)
    if "image_outputs" in out.__dataclass_fields__:  # 5.24+: the forward's output carries the encoder's
        assert torch.equal(out.image_outputs.pooler_output, features.pooler_output)


def test_tiles_without_counts():
    """Without image_num_patches: one image takes all tiles, one-tile images one each; any other split is refused."""
    model, processor = patched()
    single = inputs(processor, SINGLE)
    logits = model(**single).logits
    single.pop("image_num_patches")
    assert torch.equal(model(**single).logits, logits)
    ones = inputs(processor, TWO, sizes=[(40, 40)] * 3)
    with_counts = model(**ones).logits
    ones.pop("image_num_patches")
    assert torch.equal(model(**ones).logits, with_counts)
    tiled = inputs(processor, TWO)
    tiled.pop("image_num_patches")
    with pytest.raises(FlowCutInputError, match="pass image_num_patches"):
        model(**tiled)


@pytest.mark.parametrize("prompts", [SINGLE, PAIR, TWO], ids=["single", "left-padded pair", "two images"])
def test_stage_prefill_and_first_decode_step_equal_oracle(prompts):
    """llm_stage=True: each image's tower keeps 2K tokens (the oracle's tower at 2K), decoder layer 1 the K best;
    the prefill logits (forward and generate) and the next step's, which reads the cut cache, against float64."""
    model, processor = patched(llm_stage=True, dtype=torch.float64)
    batch = inputs(processor, prompts)
    batch["pixel_values"] = batch["pixel_values"].double()
    tiles = batch["image_num_patches"].tolist()
    logits = model(**batch).logits[:, -1]
    out = model.generate(**batch, max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    first = out.sequences[:, batch["input_ids"].shape[1]]
    tower = torch.stack([naive_image(model, chunk, 2 * K)[0] for chunk in batch["pixel_values"].split(tiles)])
    want, step, kept = naive_lm_stage(model, batch["input_ids"], batch["attention_mask"], tower, K, first)
    assert [len(k) for k in kept] == [K] * len(tiles) and any(k != list(range(K)) for k in kept)
    for got, expected in ((logits, want), (out.logits[0], want), (out.logits[1], step)):
        assert (got.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_stage_takes_inputs_embeds_and_runs_on_the_core_alone():
    model, processor = patched(llm_stage=True)
    batch = inputs(processor, PAIR)
    logits = model(**batch).logits
    embeds = model.get_input_embeddings()(batch["input_ids"])
    given = {k: v for k, v in batch.items() if k != "input_ids"}
    assert torch.equal(model(inputs_embeds=embeds, **given).logits, logits)
    core = random_internvl().model
    flowcut(core, K, processor=tiny_internvl_processor(random_internvl()), llm_stage=True)
    out = core(**batch)
    assert out.last_hidden_state.shape == (2, batch["input_ids"].shape[1], 32)
    assert torch.allclose(model.lm_head(out.last_hidden_state), logits, rtol=1e-5, atol=1e-6)


# --- generate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("llm_stage", [False, True], ids=["tower", "stage"])
def test_generate_batched_equals_single_and_cache(llm_stage):
    model, processor = patched(llm_stage=llm_stage)
    check_generate_batched(model, inputs(processor, TWO), singles(processor, TWO), 5, llm_stage)


@pytest.mark.parametrize("llm_stage", [False, True], ids=["tower", "stage"])
def test_generate_beams_and_several_sequences(llm_stage):
    model, processor = patched(llm_stage=llm_stage)
    batch = inputs(processor, PAIR)
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + 3)
    for i, single in enumerate(singles(processor, PAIR)):  # each prompt's best beam is its own single-prompt one
        assert torch.equal(model.generate(**single, max_new_tokens=3, num_beams=2)[0, -3:], out[2 * i, -3:])


@pytest.mark.parametrize("llm_stage", [False, True], ids=["tower", "stage"])
def test_bfloat16_is_finite(llm_stage):
    model, processor = patched(llm_stage=llm_stage, dtype=torch.bfloat16)
    batch = inputs(processor, PAIR)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    assert_bfloat16_finite(model, batch)


# --- processor, per instance, reversible ---------------------------------------------------------


@pytest.mark.parametrize("target", [1, 5, 15])
def test_processor_emits_target_tokens(target):
    model = random_internvl()
    processor, other = tiny_internvl_processor(model), tiny_internvl_processor(model)
    stock = runs(processor(text=TWO, images=nested(TWO), padding=True))
    assert stock == [3 * TILE_TOKENS, TILE_TOKENS, 3 * TILE_TOKENS]
    flowcut(model, target, processor=processor)
    batch = processor(text=TWO, images=nested(TWO), padding=True, return_tensors="pt")
    assert runs(batch) == [target] * 3
    ids = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert ids[ids.index(START):ids.index(END) + 1] == [START] + [IMAGE] * target + [END]
    assert runs(other(text=TWO, images=nested(TWO), padding=True)) == stock
    remove_flowcut(model)
    assert runs(processor(text=TWO, images=nested(TWO), padding=True)) == stock


def test_remove_gives_back_the_stock_model_and_processor():
    model, plain = random_internvl(seed=3), random_internvl(seed=3)
    processor = tiny_internvl_processor(model)
    images = nested(PAIR, sizes=[(40, 40), (48, 40)])  # one tile each: the stock model takes the same inputs
    batch = lambda: processor(text=PAIR, images=images, padding=True, return_tensors="pt")  # noqa: E731
    check_remove_gives_back(model, plain, processor, batch, K, new_tokens=4)


def test_internvl_model_alone():
    core = random_internvl().model
    processor = tiny_internvl_processor(random_internvl())
    flowcut(core, K, processor=processor)
    out = core(**inputs(processor, PAIR))
    assert out.last_hidden_state.shape[0] == 2
    remove_flowcut(core)
    assert "get_image_features" not in vars(core) and "forward" not in vars(core)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_arguments_leave_model_unchanged():
    model = random_internvl()
    refused(model, r"target_num", target_num=TILE_TOKENS)
    refused(model, r"target_num", target_num=0)
    refused(model, r"target_num=8 is too large for llm_stage=True: .* use target_num <= 7", target_num=8,
            llm_stage=True)
    refused(model, r"llm_stage must be True, False or None", target_num=K, llm_stage="yes")
    refused(model, r"feature_layer=-2", target_num=K, feature_layer=-2)
    refused(model, "backend='nope'", target_num=K, backend="nope")
    refused(model, "static schedule", target_num=K, schedule=object())
    model.config.vision_feature_layer = -2
    refused(model, r"vision_feature_layer=-2", target_num=K)


def test_mismatched_processors_are_refused():
    from tiny.gemma3 import random_gemma3, tiny_gemma3_processor

    model = random_internvl()
    gemma = tiny_gemma3_processor(random_gemma3())
    refused(model, r"processor is a Gemma3Processor; pass the model's InternVLProcessor", gemma, target_num=K,
            processor=gemma)
    other = tiny_internvl_processor(model)
    other.image_seq_length = 4
    refused(model, r"processor does not match the model: its image_seq_length 4", other, target_num=K,
            processor=other)
    check_shared_processor_refused(model, tiny_internvl_processor(model), random_internvl(), K)


def test_mismatched_placeholders_name_the_processor():
    model = random_internvl()
    stock = tiny_internvl_processor(model)(text=SINGLE, images=nested(SINGLE), return_tensors="pt")
    check_stock_placeholders_refused(model, stock, K)


@pytest.mark.parametrize("llm_stage,target,match", [
    (False, 2, r"an image of 3 tiles cannot keep 2 tokens \(target_num=2\)"),
    (True, 1, r"an image of 3 tiles cannot keep 2 tokens \(target_num=1, doubled by llm_stage\)"),
], ids=["tower", "stage"])
def test_too_many_tiles_for_target_are_refused(llm_stage, target, match):
    model, processor = patched(target=target, llm_stage=llm_stage)
    batch = inputs(processor, SINGLE)
    with pytest.raises(FlowCutInputError, match=match):
        model(**batch)


def test_a_missing_processor_hook_is_refused(monkeypatch):
    """The processor's token hooks moved away (as a future release might): refused, naming the release; the model
    and the processor keep their attributes."""
    from flowcut_kernels.models import seams

    model = random_internvl()
    processor = tiny_internvl_processor(model)
    for name in ("replace_image_token", "_insert_media_placeholders"):
        for owner in [c for c in type(processor).__mro__ if name in vars(c)]:
            monkeypatch.delattr(owner, name)
    refused(model, rf"transformers {seams.RELEASE} has no InternVLProcessor", processor, target_num=K,
            processor=processor)


def test_reapply_replaces_the_target_and_keeps_the_processor():
    model, processor = patched()
    flowcut(model, 7)
    batch = inputs(processor, PAIR)
    assert runs(batch) == [7, 7]
    assert model.generate(**batch, max_new_tokens=2).shape[1] == batch["input_ids"].shape[1] + 2
    assert model.model.get_image_features(batch["pixel_values"], image_num_patches=batch["image_num_patches"]
                                          ).pooler_output.shape == (2, 7, 32)

"""Past the first token: every decode step of ``generate`` on a patched model against the float64 oracle of
tests/oracle/decode.py (the pruned prompt's cache, then each generated token at the position docs/semantics.md gives
it), for LLaVA-1.5 (language-model stage), LLaVA-NeXT and Qwen2-VL / Qwen2.5-VL (with and without the stage), a single
prompt and left-padded batches of different image sizes; Qwen's ``rope_deltas`` directly; beams and several returned
sequences on NeXT and Qwen equal to each prompt alone; LLaVA-NeXT with an odd ``target_num``.

Tolerance: each step's logits within 1e-4 of the oracle's, relative to their norm (float32 model, float64 oracle).
"""
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from oracle.decode import naive_llava_decode, naive_qwen_decode
from oracle.llava import naive_llava_features
from oracle.llava_next import naive_next_features
from vlm_cases import random_images as next_images
from test_llava_next import tiny_next
from test_lm_stage import (
    MIXED,
    stage_llava,
)
from test_lm_stage import SINGLE as LLAVA_SINGLE
from test_lm_stage import inputs as llava_inputs
from test_qwen2_vl import IMAGE, MODELS, _pixels, _prompts
from transformers import Qwen2VLModel

from flowcut_kernels import flowcut
from tiny.llava_next import tiny_llava_next_processor
from flowcut_kernels.models import seams

pytest.importorskip("PIL", reason="transformers' image processors need Pillow")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NEW = 4  # generated tokens: the prefill's and 3 decode steps
K = 10


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def assert_steps_close(got, want, rtol=1e-4):
    """got: generate's logits (a tuple of n (B, V)); want (n, B, V) float64: every step of every row within ``rtol``
    of the oracle, relative to its norm."""
    got = torch.stack(got).double()
    assert got.shape == want.shape, (got.shape, want.shape)
    error = (got - want).norm(dim=-1) / want.norm(dim=-1)  # (n, B)
    assert bool((error <= rtol).all()), error.tolist()


def generate(model, batch, **kwargs):
    out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences[:, batch["input_ids"].shape[1]:], out.logits


def beam_search(model, batch):
    """num_beams=2, num_return_sequences=2, no length penalty: the generated tokens (2B, NEW) and each sequence's
    score (2B,), the sum of its tokens' log-probabilities."""
    out = model.generate(**batch, num_beams=2, num_return_sequences=2, max_new_tokens=NEW, length_penalty=0.0,
                         output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2 * len(batch["input_ids"]), batch["input_ids"].shape[1] + NEW)
    return out.sequences[:, -NEW:], out.sequences_scores


def log_probability(model, alone, tokens):
    """The log-probability of ``tokens`` (NEW,) after the single prompt ``alone``: its prefill, then each token fed on
    the cache (no beams: the prompt's own images, whatever the beam expansion does). Qwen's decode positions are
    given explicitly (the real length plus rope_deltas: test_qwen_decode_steps_and_rope_deltas_equal_oracle checks
    them), as generate gives them."""
    out = model(**alone, use_cache=True)
    mask, cache, total = alone["attention_mask"], seams.output_cache(out), 0.0
    deltas = getattr(model.model, "rope_deltas", None)
    for i, token in enumerate(tokens):
        total += float(torch.log_softmax(out.logits[0, -1].double(), -1)[token])
        if i + 1 < len(tokens):
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            positions = None if deltas is None else (mask.sum() - 1 + deltas).view(1, 1, 1).expand(3, 1, 1)
            out = model(input_ids=token.view(1, 1), attention_mask=mask, use_cache=True, position_ids=positions,
                        **seams.cache_arg(cache))
    return total


def assert_same_beams(model, alone, batched, i):
    """Prompt i's two sequences in the batched beam search equal those it gets alone, and their scores are their
    log-probabilities given the prompt's own images (within 1e-4): a wrong image order in the beam expansion, which a
    prompt alone would share with the batch, changes them."""
    tokens, scores = beam_search(model, alone)
    assert torch.equal(tokens, batched[0][2 * i: 2 * i + 2])
    torch.testing.assert_close(scores, batched[1][2 * i: 2 * i + 2], rtol=1e-4, atol=1e-5)
    want = torch.tensor([log_probability(model, alone, row) for row in tokens], dtype=scores.dtype)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)


# --- LLaVA-1.5 with the language-model stage ------------------------------------------------------


@pytest.mark.parametrize("prompts", [LLAVA_SINGLE, MIXED], ids=["single", "batch"])
def test_llava_decode_steps_equal_oracle(prompts):
    model, twin = flowcut(stage_llava(), K, llm_stage=True), stage_llava()
    batch = llava_inputs(model, prompts)
    if len(prompts) > 1:
        assert (batch["attention_mask"] == 0).any()  # left-padded
    tokens, logits = generate(model, batch)
    features = naive_llava_features(twin, batch["pixel_values"], 2 * K)[1]
    want, kept = naive_llava_decode(twin, batch["input_ids"], batch["attention_mask"], list(features), K, tokens)
    assert all(len(k) == K for k in kept)
    assert_steps_close(logits, want)


# --- LLaVA-NeXT -----------------------------------------------------------------------------------


NEXT_CASES = {
    "single": (["USER: <image> w1 w2 w3 w4 ASSISTANT:"], [(40, 70)]),
    # Left-padded, images of 4 and 5 crops (1×3 grid with a margin, 2×2 grid).
    "batch": (["USER: <image> w1 w2 w3 w4 w5 w6 ASSISTANT:", "USER: w7 <image> ASSISTANT:"], [(30, 90), (64, 64)]),
}


def next_run(target, llm_stage, prompts, sizes):
    model = tiny_next()
    processor = tiny_llava_next_processor(model)
    flowcut(model, target, processor=processor, llm_stage=llm_stage)
    batch = processor(text=prompts, images=next_images(sizes), padding=True, return_tensors="pt")
    return model, processor, batch


def check_next(target, llm_stage, prompts, sizes):
    model, _, batch = next_run(target, llm_stage, prompts, sizes)
    twin = tiny_next()
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [target * p.count("<image>")
                                                                                   for p in prompts]
    tokens, logits = generate(model, batch)
    features, sources = naive_next_features(twin, batch["pixel_values"], batch["image_sizes"], target, llm_stage)
    got = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    assert [w.tolist() for w in got.keep_indices] == [[list(s) for s in source] for source in sources]
    if not llm_stage:
        assert [len(f) for f in features] == [target] * len(sizes)
    want, kept = naive_llava_decode(twin, batch["input_ids"], batch["attention_mask"], features, target, tokens,
                                    llm_stage=llm_stage)
    assert all(len(k) == target for k in kept)
    assert_steps_close(logits, want)


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("case", NEXT_CASES)
def test_next_decode_steps_equal_oracle(case, llm_stage):
    check_next(K, llm_stage, *NEXT_CASES[case])


@pytest.mark.parametrize("llm_stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("target", [7, 11])
def test_next_odd_target_equals_oracle(target, llm_stage):
    """An odd K: each crop keeps ⌊K/2⌋; K = 7 and 11 divide neither the 3 crops of a 1×2 grid nor the 5 of a 2×2 one
    (nor the 4 of a 1×3): the oracle's split, prefill and decode steps."""
    prompts = ["USER: <image> w1 <image> ASSISTANT:", "USER: w2 <image> w3 ASSISTANT:"]
    check_next(target, llm_stage, prompts, [(32, 64), (50, 50), (30, 90)])


def test_next_beams_equal_each_prompt_alone():
    """num_beams=2, num_return_sequences=2: each prompt's two sequences are those it gets alone (its images, as a
    group, in order), the first prompt holding two images of different sizes."""
    prompts = ["USER: <image> w1 <image> ASSISTANT:", "USER: <image> w2 ASSISTANT:"]
    sizes = [(30, 90), (64, 64), (90, 30)]
    model, processor, batch = next_run(K, True, prompts, sizes)
    out = beam_search(model, batch)
    for i, (prompt, mine) in enumerate(zip(prompts, ([0, 1], [2]))):
        alone = processor(text=[prompt], images=next_images(sizes)[mine[0]: mine[-1] + 1], return_tensors="pt")
        assert_same_beams(model, alone, out, i)


# --- Qwen2-VL and Qwen2.5-VL ----------------------------------------------------------------------


QWEN_TARGET = 5
QWEN_CASES = {
    "single": ([[10, None, 11, 12]], [(1, 8, 12)], True),
    "batch": ([[10, None, 11, 12], [13, None, 14]], [(1, 8, 12), (1, 12, 6)], True),
    "two-images": ([[10, None, 11, None, 12], [13, None, 14]], [(1, 8, 8), (1, 6, 10), (1, 4, 4)], True),
    # No <|vision_end|>: the second prompt's last token is an image's; its first generated token is text after the
    # image, at p + max(h', w') whatever tokens the prune kept.
    "ends-on-image": ([[10, None, 11, 12], [13, None]], [(1, 8, 12), (1, 12, 6)], False),
}
#: with the processor's mm_token_type_ids (transformers > 5.0 takes them), or without (as 5.0, or hand-written ids)
PER_REAL_TOKEN = "mm_token_type_ids" in inspect.signature(Qwen2VLModel.forward).parameters
TYPE_IDS = [False, True] if PER_REAL_TOKEN else [False]


def qwen_batch(case, type_ids):
    prompts, grids, end = QWEN_CASES[case]
    ids, mask = _prompts(prompts, grids, QWEN_TARGET, end)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": _pixels(grids),
             "image_grid_thw": torch.tensor(grids)}
    if type_ids:
        batch["mm_token_type_ids"] = (ids == IMAGE).long()
    return batch, grids


@pytest.mark.parametrize("type_ids", TYPE_IDS, ids=lambda t: "type-ids" if t else "no-type-ids")
@pytest.mark.parametrize("stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("case", QWEN_CASES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qwen_decode_steps_and_rope_deltas_equal_oracle(name, case, stage, type_ids):
    batch, grids = qwen_batch(case, type_ids)
    model = flowcut(MODELS[name][0](), QWEN_TARGET, llm_stage=stage)
    twin = MODELS[name][0]()
    tokens, logits = generate(model, batch)
    want, starts = naive_qwen_decode(twin, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], grids,
                                     QWEN_TARGET, tokens, llm_stage=stage)
    # rope_deltas: the first generated token's position minus the length generate counts it from (the real tokens
    # on releases with mm_token_type_ids, the padded length on 5.0)
    length = batch["attention_mask"].sum(1) if PER_REAL_TOKEN else batch["input_ids"].shape[1]
    assert model.model.rope_deltas.flatten().tolist() == (starts - length).tolist()
    assert_steps_close(logits, want)


@pytest.mark.parametrize("stage", [True, False], ids=["stage", "tower-only"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qwen_beams_equal_each_prompt_alone(name, stage):
    """num_beams=2, num_return_sequences=2 on a batch whose first prompt holds two images of different sizes: each
    prompt's two sequences are those it gets alone."""
    batch, grids = qwen_batch("two-images", PER_REAL_TOKEN)
    model = flowcut(MODELS[name][0](), QWEN_TARGET, llm_stage=stage)
    out = beam_search(model, batch)
    prompts = QWEN_CASES["two-images"][0]
    pixels = batch["pixel_values"].split([t * h * w for t, h, w in grids])
    for i, images in enumerate(([0, 1], [2])):
        ids, mask = _prompts(prompts[i: i + 1], [grids[g] for g in images], QWEN_TARGET)
        alone = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([pixels[g] for g in images]),
                 "image_grid_thw": torch.tensor([grids[g] for g in images])}
        if PER_REAL_TOKEN:
            alone["mm_token_type_ids"] = (ids == IMAGE).long()
        assert_same_beams(model, alone, out, i)

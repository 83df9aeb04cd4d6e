"""Checks shared by the LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma 3 and language-model-stage tests: random images,
objects' attributes saved and given back, a refused flowcut() that changes nothing, remove_flowcut() giving back the
stock model and processor, batched generation, refused processors and placeholders."""

import copy

import numpy as np
import pytest
import torch

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut


def random_images(sizes, seed=0):
    """Random uint8 RGB images (H, W, 3), one per (H, W) in ``sizes``, drawn in order from one seeded generator."""
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in sizes]


def snapshot_attributes(*objects):
    """Each object with a copy of its attribute dict, for :func:`assert_restored`."""
    return [(obj, dict(vars(obj))) for obj in objects]


def assert_restored(snapshot):
    """Each object has the snapshot's attributes again, no more, no fewer, each the very same object."""
    for obj, attrs in snapshot:
        assert vars(obj).keys() == attrs.keys(), set(vars(obj)) ^ set(attrs)
        assert all(vars(obj)[k] is v for k, v in attrs.items())


def refused(model, match, *objects, **kwargs):
    """``flowcut(model, **kwargs)`` raises a FlowCutInputError matching ``match``; the model, its core and
    ``objects`` keep their attributes."""
    snapshot = snapshot_attributes(model, model.model, *objects)
    with pytest.raises(FlowCutInputError, match=match):
        flowcut(model, **kwargs)
    assert_restored(snapshot)


def check_remove_gives_back(model, plain, processor, batch, target, new_tokens):
    """Patch ``model`` and ``processor`` for ``target`` tokens, generate, remove_flowcut(): both have their stock
    attributes again, ``batch()`` (the processor's inputs) its stock ids, and the model generates ``new_tokens`` as
    ``plain`` (its unpatched twin) does. Returns a deep copy taken while patched, which keeps its patch."""
    stock = batch()
    before = plain.generate(**stock, max_new_tokens=new_tokens)
    snapshot = snapshot_attributes(model, model.model, processor)
    flowcut(model, target, processor=processor)
    model.generate(**batch(), max_new_tokens=2)
    clone = copy.deepcopy(model)
    assert remove_flowcut(model) is model
    assert_restored(snapshot)
    assert torch.equal(batch()["input_ids"], stock["input_ids"])
    assert torch.equal(model.generate(**stock, max_new_tokens=new_tokens), before)
    assert clone.flowcut_config.target_num == target  # a copy keeps its own patch
    return clone


def check_generate_batched(model, batch, singles, new, llm_stage):
    """Greedy generation of ``new`` tokens: each row of ``batch`` as its prompt alone (``singles``, in order), and
    the same without the cache; with ``llm_stage`` only the first token is bound there, as without the cache the
    stage re-runs with the newest token as relay."""
    out = model.generate(**batch, max_new_tokens=new)
    for i, single in enumerate(singles):
        assert torch.equal(model.generate(**single, max_new_tokens=new)[0, -new:], out[i, -new:])
    uncached = model.generate(**batch, max_new_tokens=new, use_cache=False)
    if llm_stage:
        assert torch.equal(uncached[:, -new], out[:, -new])
    else:
        assert torch.equal(uncached, out)


def assert_bfloat16_finite(model, batch):
    """The (bfloat16) model's logits for ``batch`` are bfloat16 and finite."""
    logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and bool(logits.isfinite().all())


def check_shared_processor_refused(model, shared, other, target):
    """A processor patched by ``flowcut(other, target, processor=shared)`` is refused for ``model``, both unchanged."""
    flowcut(other, target, processor=shared)
    refused(model, r"already patched by flowcut\(\) for another model", shared, target_num=target, processor=shared)


def check_stock_placeholders_refused(model, stock, target, **patch):
    """Patched for ``target`` tokens, the model refuses ``stock`` (an unpatched processor's inputs), naming the
    processor."""
    flowcut(model, target, **patch)
    with pytest.raises(FlowCutInputError, match=r"image placeholder.*processor=processor"):
        model(**stock)

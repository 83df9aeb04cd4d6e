"""The transformers seams (flowcut_kernels/models/seams.py): a release outside the tested range is named once, a seam
the installed release lacks is refused before the model changes, and the newest release sees no deprecated call."""

import warnings

import pytest
import torch
from transformers.utils import logging as hf_logging

from flowcut_kernels import FlowCutInputError, flowcut, remove_flowcut
from flowcut_kernels.bench.random_models import random_clip_vision
from tiny.llava import random_llava, tiny_llava_processor
from tiny.llava_next import random_llava_next, tiny_llava_next_processor
from tiny.qwen import random_qwen2_vl, tiny_qwen2_vl_processor
from flowcut_kernels.models import seams

pytest.importorskip("PIL", reason="transformers' image processors need Pillow")


def test_a_release_outside_the_tested_range_warns_once(monkeypatch):
    monkeypatch.setattr(seams, "RELEASE", "5.99.0")
    monkeypatch.setattr(seams, "_warned", False)
    tower = random_clip_vision("tiny", seed=0)
    with pytest.warns(UserWarning, match=r"tested with transformers 5\.0\.0 to 5\.25\.0.*5\.99\.0 is installed"):
        flowcut(tower, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flowcut(tower, 8)


def test_a_tested_release_does_not_warn(monkeypatch):
    monkeypatch.setattr(seams, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        flowcut(random_clip_vision("tiny", seed=0), 8)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_a_missing_seam_is_refused_with_the_release_and_the_model_unchanged(family, monkeypatch):
    """A processor hook moved away (as a future release might): FlowCutInputError naming the release and the tested
    range; the model and the processor keep their attributes, also when a patch was already on."""
    if family == "llava":
        model = random_llava(seed=0)
        processor = tiny_llava_processor(model)
        monkeypatch.delattr(processor, "num_additional_image_tokens")
    elif family == "llava_next":
        model = random_llava_next(seed=0)
        processor = tiny_llava_next_processor(model)
        monkeypatch.delattr(type(processor), "_get_number_of_features")
    else:
        model = random_qwen2_vl(seed=0)
        processor = tiny_qwen2_vl_processor()
        if not hasattr(type(processor), "replace_image_token"):
            pytest.skip("this release's Qwen processor has no per-image hook to remove")
        for owner in [c for c in type(processor).__mro__ if "replace_image_token" in vars(c)]:
            monkeypatch.delattr(owner, "replace_image_token")
    flowcut(model, 4)  # patched without a processor first
    before = {id(obj): dict(vars(obj)) for obj in (model, model.model, processor)}
    with pytest.raises(FlowCutInputError, match=rf"transformers {seams.RELEASE} has no .*tested with transformers "
                                                rf"5\.0\.0 to 5\.25\.0"):
        flowcut(model, 8, processor=processor)
    for obj in (model, model.model, processor):
        assert vars(obj) == before[id(obj)]
    assert model.flowcut_config.target_num == 4
    remove_flowcut(model)


def test_output_fields_follow_the_installed_classes():
    """The staged prefill's output is the stock forward's class, with the cache under the release's own name and
    the images' features where the class keeps them."""
    model = random_llava(seed=0)
    processor = tiny_llava_processor(model)
    flowcut(model, 4, processor=processor, llm_stage=True)
    batch = processor(text=["USER: <image> w1 w2 ASSISTANT:"], images=[torch.zeros(3, 32, 32)], return_tensors="pt")
    with torch.no_grad():
        out = model.model(**batch)
    assert type(out) is seams._core_output_class(model.model)
    assert seams.output_cache(out).get_seq_length() == batch["input_ids"].shape[1]
    assert seams.image_features(out).shape == (8, model.config.text_config.hidden_size)  # the tower's 2K


def test_generate_on_the_installed_release_calls_nothing_deprecated(caplog):
    """No FutureWarning and no 'deprecated' log line from transformers while the patched models generate."""
    hf_logging.warning_once.cache_clear()
    cases = []
    next_model = random_llava_next(seed=0)
    cases.append((next_model, tiny_llava_next_processor(next_model), "USER: <image> w1 ASSISTANT:", 10))
    qwen = random_qwen2_vl(seed=0)
    if hasattr(type(tiny_qwen2_vl_processor()), "replace_image_token"):
        cases.append((qwen, tiny_qwen2_vl_processor(), "w1 <|vision_start|><|image_pad|><|vision_end|>", 4))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="transformers"):
        warnings.simplefilter("always")
        for model, processor, prompt, k in cases:
            flowcut(model, k, processor=processor)
            batch = processor(text=[prompt], images=[torch.zeros(3, 32, 32, dtype=torch.uint8)], return_tensors="pt")
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    deprecated += [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert not deprecated


def test_the_declared_range_is_the_tested_range():
    """setup.py declares transformers from the oldest tested release to below the next minor, and CI pins both."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    oldest = seams.OLDEST.removesuffix(".0")
    assert f'"transformers>={oldest},<{seams.NEXT}"' in (root / "setup.py").read_text()
    ci = (root / ".ci" / "run").read_text()
    assert f"NEWEST_TRANSFORMERS={seams.NEWEST}" in ci and f"OLDEST_TRANSFORMERS={seams.OLDEST}" in ci
    assert seams.NEXT == ".".join(seams.NEWEST.split(".")[:1] + [str(int(seams.NEWEST.split(".")[1]) + 1)])

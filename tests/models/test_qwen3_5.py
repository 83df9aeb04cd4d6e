"""FlowCut on Qwen3.5 (releases that have it): the tower stage against the float64 oracle, whole groups, generation,
reversibility, and ``llm_stage=True`` refused (its hybrid language model; flowcut_kernels/models/qwen3_5.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import test_qwen2_vl
from oracle.qwen3_vl import naive_qwen3_5_logits
from test_qwen2_vl import TARGET, check_prefill
from test_qwen3_vl import CASES
from tiny.qwen3 import random_qwen3_5, tiny_qwen3_vl_processor

from flowcut_kernels import FlowCutInputError, flowcut
from flowcut_kernels.models import seams

pytestmark = pytest.mark.skipif(not seams.qwen3_5_classes(), reason=f"transformers {seams.RELEASE} has no qwen3_5")


@pytest.fixture
def as_qwen2_case(monkeypatch):
    """test_qwen2_vl's model-parametrised checks, run on the tiny Qwen3.5 under the name "qwen3_5"."""
    monkeypatch.setitem(test_qwen2_vl.MODELS, "qwen3_5", (random_qwen3_5, tiny_qwen3_vl_processor))


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_oracle(case):
    prompts, grids = CASES[case]
    model = random_qwen3_5()
    features, _ = check_prefill(model, prompts, grids, lambda *args: naive_qwen3_5_logits(*args, TARGET))
    assert model.flowcut_config.llm_stage is False  # Qwen3.5: the tower stage only
    assert features.deepstack_features is None


def test_llm_stage_refused_model_unchanged():
    model = random_qwen3_5()
    before = dict(vars(model.model))
    with pytest.raises(FlowCutInputError, match="llm_stage=True is not supported on Qwen3.5"):
        flowcut(model, TARGET, llm_stage=True)
    assert vars(model.model) == before


def test_unpruned_tower_equals_stock(as_qwen2_case):
    test_qwen2_vl.test_unpruned_tower_equals_stock("qwen3_5")


def test_merged_tokens_are_whole_blocks(as_qwen2_case):
    test_qwen2_vl.test_merged_tokens_are_whole_blocks("qwen3_5")


def test_generate_batched_equals_single_and_cache_off(as_qwen2_case):
    test_qwen2_vl.test_generate_batched_equals_single_and_cache_off("qwen3_5", False)


def test_remove_flowcut_restores_stock(as_qwen2_case):
    test_qwen2_vl.test_remove_flowcut_restores_stock("qwen3_5")


def test_processor_emits_target_placeholders(as_qwen2_case):
    test_qwen2_vl.test_processor_emits_target_placeholders("qwen3_5")

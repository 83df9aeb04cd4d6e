"""The lmms-eval model ``flowcut`` through lmms-eval's own entry point, on a tiny local task and tiny seeded models.

lmms-eval needs its own environment (torch 2.14.1 + torchvision 0.29.1, see .ci/eval), so these tests skip where
it cannot be imported. Each run goes through ``simple_evaluate(model=...)``, which looks the name up in lmms-eval's
registry (the entry point of setup.py for ``flowcut``) and builds it with ``create_from_arg_string``. A hook
records the sequence length of every prefill at the decoder's final norm: the visual tokens that reached the
decoder are that length minus the prompt's text tokens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here: run .ci/eval (its own environment)")

import torch  # noqa: E402

from flowcut_kernels.bench.random_models import random_pixels  # noqa: E402
from tiny.llava import random_llava, tiny_llava_processor  # noqa: E402
from tiny.qwen import random_qwen2_vl, tiny_qwen2_vl_processor  # noqa: E402

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")

QUESTIONS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
#: A chat template for the tiny word-level tokenizers: words split on spaces, the image placeholder as given.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'USER:' if m['role'] == 'user' else 'ASSISTANT:' }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"answered": float(bool(results[0].strip()))}
'''
TASK_YAML = """
task: tiny_vqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A task folder (yaml + utils.py) and its dataset (DatasetDict.save_to_disk): 3 images, 3 questions."""
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    root = tmp_path_factory.mktemp("task")
    generator = torch.Generator().manual_seed(0)
    images = [PILImage.fromarray(torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy())
              for _ in QUESTIONS]
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    data = Dataset.from_dict({"image": images, "question": QUESTIONS, "answer": ["w1"] * len(QUESTIONS)},
                             features=features)
    DatasetDict({"test": data}).save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "tiny_vqa.yaml").write_text(TASK_YAML.format(data=root / "data"))
    return tasks


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny seeded LLaVA-1.5 (CLIP tower of 8×8 patches) and its processor, saved."""
    path = tmp_path_factory.mktemp("llava")
    model = random_llava(seed=0)
    processor = tiny_llava_processor(model)
    processor.chat_template = CHAT_TEMPLATE.replace("IMAGE", "<image>")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny seeded Qwen2-VL and a stock Qwen2VLProcessor (tiny tokenizer, 2-px patches, 2×2 merge), saved."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    path = tmp_path_factory.mktemp("qwen")
    model = random_qwen2_vl(seed=0)
    tiny = tiny_qwen2_vl_processor()
    processor = Qwen2VLProcessor(
        image_processor=tiny.image_processor, tokenizer=tiny.tokenizer, video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"),
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


#: Tokens per image without pruning at 40×40 pixels: LLaVA's tower resizes to its 16×16 input (8×8 patches of 2
#: px, the CLS row dropped); Qwen2-VL keeps 40×40 (min/max pixels below): 20×20 patches, merged 2×2.
UNPRUNED = {"llava_hf": 64, "qwen2_vl": 100}
#: The base classes' own arguments (lmms-eval passes device=cpu itself: --device / simple_evaluate(device=...)).
BASE_ARGS = {"llava_hf": "device_map=cpu,dtype=float32", "qwen2_vl": "device_map=cpu,min_pixels=1600,max_pixels=1600"}


class PrefillLengths:
    """The sequence length of each prefill (length > 1) that reaches the language model's final norm, whichever
    way the decoder layers ran (stock, or FlowCut's language-model stage): a global forward pre-hook finds each
    LLaVA / Qwen2-VL model when it is first called and hooks its decoder's final norm."""

    MODELS = ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration")

    def __init__(self):
        self.lengths: list[int] = []
        self.hooked: list = []

    def __call__(self, module, args):
        if type(module).__name__ in self.MODELS and not any(m is module for m, _ in self.hooked):
            norm = module.model.language_model.norm
            self.hooked.append((module, norm.register_forward_hook(self.record)))

    def record(self, module, args, output):
        if output.shape[1] > 1:
            self.lengths.append(output.shape[1])

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        for _, handle in self.hooked:
            handle.remove()


def evaluate(model: str, model_args: str, task_dir, tmp_path) -> tuple[dict, list[int]]:
    """simple_evaluate on the tiny task; (results, prefill lengths of the language model)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    with PrefillLengths() as seen:
        results = simple_evaluate(
            model=model, model_args=model_args, tasks=["tiny_vqa"], batch_size=1, device="cpu", log_samples=True,
            task_manager=TaskManager(include_path=str(task_dir), model_name=model),
        )
    return results, seen.lengths


def answers(results: dict) -> list[str]:
    return [s["filtered_resps"][0] for s in results["samples"]["tiny_vqa"]]


@pytest.mark.parametrize("base", ["llava_hf", "qwen2_vl"])
def test_flowcut_model_prunes_the_base_and_records_its_settings(base, task_dir, llava_dir, qwen_dir, tmp_path):
    path = {"llava_hf": llava_dir, "qwen2_vl": qwen_dir}[base]
    stock, stock_lengths = evaluate(base, f"pretrained={path},{BASE_ARGS[base]}", task_dir, tmp_path)
    target = 8
    args = f"base={base},pretrained={path},{BASE_ARGS[base]},target_num={target}"
    pruned, pruned_lengths = evaluate("flowcut", args, task_dir, tmp_path)

    # Every question was answered (lmms-eval records an empty answer when generate raised).
    for results in (stock, pruned):
        assert results["results"]["tiny_vqa"]["answered,none"] == 1.0
        assert all(answers(results)), answers(results)
    # The settings are in the results: the arguments echoed, and the FlowCut class that ran.
    config = pruned["config"]
    assert config["model"] == "flowcut"
    assert config["model_args"] == args
    assert config["model_backend"].startswith("flowcut_kernels.eval.lmms.FlowCut")
    assert "FlowCut" not in stock["config"]["model_backend"]
    # One prefill per question; each reached the decoder with `target` visual tokens instead of all of them.
    assert len(stock_lengths) == len(pruned_lengths) == len(QUESTIONS)
    for full, pruned_length in zip(stock_lengths, pruned_lengths):
        assert full - pruned_length == UNPRUNED[base] - target, (stock_lengths, pruned_lengths)


def test_llm_stage_and_static_schedule_take_effect(task_dir, llava_dir, tmp_path):
    """LLaVA with the language-model stage (tower to 2K, decoder layer 1 keeps K: the prefill's last hidden state
    holds K visual tokens), and with a static schedule file calibrated for K."""
    from transformers import LlavaForConditionalGeneration

    from flowcut_kernels import calibrate_schedule

    tower = LlavaForConditionalGeneration.from_pretrained(llava_dir).model.vision_tower
    with torch.inference_mode():
        schedule = calibrate_schedule(tower, random_pixels(tower, 4, seed=3), 8, feature_layer=-2)
    path = tmp_path / "schedule.json"
    path.write_text(schedule.to_json())
    _, stock_lengths = evaluate("llava_hf", f"pretrained={llava_dir},{BASE_ARGS['llava_hf']}", task_dir, tmp_path)
    for target, extra in ((4, "llm_stage=true"), (8, f"schedule={path}")):
        args = f"base=llava_hf,pretrained={llava_dir},{BASE_ARGS['llava_hf']},target_num={target},{extra}"
        pruned, lengths = evaluate("flowcut", args, task_dir, tmp_path)
        assert all(answers(pruned)), answers(pruned)
        assert pruned["config"]["model_args"] == args
        assert [a - b for a, b in zip(stock_lengths, lengths)] == [UNPRUNED["llava_hf"] - target] * len(QUESTIONS)


@pytest.mark.parametrize("model_args, message", [
    ("pretrained=x,target_num=8", "base is missing"),
    ("base=llava_next,pretrained=x,target_num=8", "base='llava_next' is not supported"),
    ("base=llava_hf,pretrained=x", "target_num is missing"),
    ("base=llava_hf,pretrained=x,target_num=0", "target_num=0 must be a positive int"),
    ("base=llava_hf,pretrained=x,target_num=-3", "target_num=-3.0 must be a positive int"),
    ("base=llava_hf,pretrained=x,target_num=8,llm_stage=maybe", "llm_stage='maybe' must be true, false or auto"),
    ("base=llava_hf,pretrained=x,target_num=8,schedule=/no/such.json", "schedule='/no/such.json' must be"),
])
def test_bad_model_args_name_the_argument(model_args, message):
    """Refused before any weight is loaded (pretrained=x does not exist)."""
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="model_args: " + re.escape(message)):
        get_model("flowcut").create_from_arg_string(model_args, {"device": "cpu"})


def test_target_the_model_cannot_keep_names_target_num(llava_dir):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="target_num=64.*target_num"):
        get_model("flowcut").create_from_arg_string(
            f"base=llava_hf,pretrained={llava_dir},{BASE_ARGS['llava_hf']},target_num=64", {"device": "cpu"})


def test_entry_point_loads_without_torch():
    """lmms-eval imports the entry point for every command: it must not pull in torch or transformers."""
    code = textwrap.dedent("""
        import json, sys
        from importlib.metadata import entry_points
        (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "flowcut"]
        manifest = ep.load()()
        print(json.dumps([manifest.model_id, manifest.chat_class_path, manifest.simple_class_path,
                          "torch" in sys.modules, "transformers" in sys.modules]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["flowcut", "flowcut_kernels.eval.lmms.FlowCutChat",
                               "flowcut_kernels.eval.lmms.FlowCutSimple", False, False]


def test_cli_runs_flowcut_through_the_entry_point(task_dir, llava_dir, tmp_path):
    """``python -m lmms_eval --model flowcut``: the results file carries the settings, every answer is non-empty,
    and the log has no error (lmms-eval exits 0 even when the evaluation raised)."""
    out = tmp_path / "out"
    args = f"base=llava_hf,pretrained={llava_dir},{BASE_ARGS['llava_hf']},target_num=8"
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "flowcut", "--model_args", args, "--tasks", "tiny_vqa",
         "--include_path", str(task_dir), "--batch_size", "1", "--device", "cpu", "--log_samples",
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    for bad in ("Traceback", "Error during evaluation", "in generating"):
        assert bad not in log, log
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_args"] == args
    assert results["config"]["model_backend"] == "flowcut_kernels.eval.lmms.FlowCutLlavaHf (chat)"
    (samples_file,) = out.rglob("*_samples_tiny_vqa.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(QUESTIONS) and all(s["filtered_resps"][0] for s in samples)

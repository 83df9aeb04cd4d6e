"""The lmms-eval model ``flowcut``: one of lmms-eval's own HF models, pruned by :func:`flowcut_kernels.flowcut`.

    lmms-eval --model flowcut --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,target_num=64 ...

``model_args`` are the base class's own (``pretrained``, ``device``, ...) plus FlowCut's, which are taken out
before the base class is built (the stock constructors refuse unknown arguments):

- ``base`` (required): the lmms-eval model to prune, one of :data:`BASES`: ``llava_hf`` (LLaVA-1.5 checkpoints),
  ``qwen2_vl``, ``qwen2_5_vl``. It is built as ``--model <base>`` would build it (its chat class, or its simple
  one under ``--force_simple``).
- ``target_num`` (required): visual tokens kept per image, a positive int (below the image's token count).
- ``llm_stage``: ``true``/``false``, or ``auto`` (default: the family's recipe — off for LLaVA-1.5, on for
  Qwen2-VL/2.5-VL).
- ``schedule``: ``adaptive`` (default, FlowCut's own) or the path of a :class:`~flowcut_kernels.StaticSchedule`
  JSON file (``StaticSchedule.to_json()``; LLaVA-1.5 only).
- ``backend``: a FlowCut backend (default ``auto``).

After the base class has loaded its model and processor, ``flowcut(model, target_num, processor=...)`` patches
both (the processor then writes ``target_num`` placeholders per image). The results show it: their
``config.model_backend`` names the FlowCut class (``flowcut_kernels.eval.lmms.FlowCut<Base>``) and
``config.model_args`` echoes the arguments; the object has every resolved setting in ``flowcut_settings``, also
logged. Bad FlowCut arguments raise ValueError naming the argument, before any weight is loaded.

Prompts: lmms-eval picks a task's model-specific prompt by the ``--model`` name, so tasks that set prompts for
``llava_hf`` or ``qwen2_vl`` give ``flowcut`` their default prompt; compare a pruned run with a stock run under
the same prompt (``--model <base>`` with the task's default, or a task without model-specific prompts).
"""

from __future__ import annotations

from pathlib import Path

from lmms_eval import utils
from lmms_eval.api.model import lmms
from lmms_eval.models import get_model
from loguru import logger

from .. import FlowCutInputError, StaticSchedule, flowcut

#: base -> the attribute of the lmms-eval object that holds the processor (the model is its ``model``).
BASES = {"llava_hf": "_image_processor", "qwen2_vl": "processor", "qwen2_5_vl": "processor"}
LLM_STAGE = {True: True, False: False, "auto": None}
ADAPTIVE = "adaptive"


def settings_from(args: dict) -> dict:
    """Take FlowCut's arguments out of ``args`` (parsed ``model_args``) and check them; returns them resolved.

    Raises ValueError naming the argument.
    """
    base = args.pop("base", None)
    if base not in BASES:
        got = " is missing" if base is None else f"={base!r} is not supported"
        raise ValueError(f"model_args: base{got}; choose one of {', '.join(BASES)} (the lmms-eval model to prune)")
    target = args.pop("target_num", None)
    if target is None:
        raise ValueError("model_args: target_num is missing; give the visual tokens kept per image, e.g. target_num=64")
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"model_args: target_num={target!r} must be a positive int (visual tokens kept per image)")
    stage = args.pop("llm_stage", "auto")
    stage = stage.lower() if isinstance(stage, str) else stage
    if stage not in LLM_STAGE:
        raise ValueError(f"model_args: llm_stage={stage!r} must be true, false or auto (the family's default)")
    schedule = args.pop("schedule", ADAPTIVE)
    if schedule != ADAPTIVE and not Path(str(schedule)).is_file():
        raise ValueError(f"model_args: schedule={schedule!r} must be {ADAPTIVE!r} or the path of a StaticSchedule "
                         "JSON file (StaticSchedule.to_json())")
    backend = args.pop("backend", "auto")
    return dict(base=base, target_num=target, llm_stage=LLM_STAGE[stage], schedule=str(schedule), backend=backend)


def build(settings: dict, base_args: dict, extra: dict, force_simple: bool) -> lmms:
    """lmms-eval's own ``settings["base"]`` model built as its ``create_from_arg_string`` builds it (``base_args``,
    the rest of ``model_args``, and ``extra``, lmms-eval's batch size and device), then patched by FlowCut."""
    base_cls = get_model(settings["base"], force_simple)
    cls = type(f"FlowCut{base_cls.__name__}", (base_cls,), {
        "__module__": __name__, "__doc__": f"lmms-eval's {base_cls.__name__}, pruned by FlowCut (module docstring)."})
    lm = cls(**base_args, **extra)
    schedule = None
    if settings["schedule"] != ADAPTIVE:
        try:
            schedule = StaticSchedule.from_json(Path(settings["schedule"]).read_text())
        except FlowCutInputError as error:
            raise ValueError(f"model_args: schedule={settings['schedule']!r}: {error}") from error
    try:
        flowcut(lm.model, settings["target_num"], processor=getattr(lm, BASES[settings["base"]]),
                llm_stage=settings["llm_stage"], schedule=schedule, backend=settings["backend"])
    except FlowCutInputError as error:
        raise ValueError(f"model_args (target_num={settings['target_num']}, llm_stage={settings['llm_stage']}, "
                         f"schedule={settings['schedule']}, backend={settings['backend']}): {error}") from error
    lm.flowcut_settings = settings
    logger.info(f"flowcut: {settings['base']} ({type(lm.model).__name__}) pruned with {settings}")
    return lm


class _FlowCut(lmms):
    """Registered under ``flowcut``; ``create_from_arg_string`` returns the patched base model (module docstring)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> lmms:
        args = utils.simple_parse_args_string(arg_string)
        settings = settings_from(args)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return build(settings, args, extra, force_simple=cls.is_simple)


class FlowCutChat(_FlowCut):
    """``--model flowcut``: the base's chat class (its simple one when it has no chat class)."""

    is_simple = False


class FlowCutSimple(_FlowCut):
    """``--model flowcut --force_simple``: the base's simple class."""

    is_simple = True

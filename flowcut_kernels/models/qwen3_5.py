"""FlowCut for HF Qwen3.5 (``Qwen3_5ForConditionalGeneration`` / ``Qwen3_5Model``, transformers releases that have
it; 5.0 does not) with its ``Qwen3VLProcessor``: the tower stage only.

Its vision tower is Qwen3-VL's without DeepStack (learned, resampled position embedding; 2×2 merge groups), so the
tower stage is :mod:`.qwen2_vl`'s group loop as for Qwen3-VL: mean-query relay, whole merge groups, per-image
schedules, K = ``target_num`` groups per image, each kept token at its group's M-RoPE position.

**No language-model stage.** Qwen3.5's language model is hybrid: most decoder layers are linear attention (a gated
delta rule, no softmax scores; each keeps a recurrent state summarising every token it has seen), one in a few is
full softmax attention. The stage needs softmax scores of the prompt's last token at decoder layer 1, a linear
layer here, and needs the layers before the prune to leave a cache of the short layout: a linear layer's recurrent
and convolution states cannot drop the pruned tokens, so the cached prefill would differ from the same prompt run
without the cache. Running the stage at the first full-attention layer instead would leave the same mixed state in
the linear layers before it. So ``llm_stage`` defaults to False for Qwen3.5 and ``llm_stage=True`` is refused.
"""

from __future__ import annotations

from ..checks import require
from . import seams
from .qwen2_vl import patch_qwen, unpatch_qwen2_vl
from .registry import Family


def patch_qwen3_5(model, target_num, *, llm_stage=None, **kwargs) -> None:
    """:func:`.qwen2_vl.patch_qwen` with the tower stage only (module docstring)."""
    require(
        llm_stage in (None, False),
        f"llm_stage={llm_stage!r} is not supported on Qwen3.5: its hybrid language model's linear-attention layers "
        f"(decoder layer 1 among them) have no softmax scores and keep a recurrent state of every prompt token, so "
        f"tokens cannot be dropped inside it; leave llm_stage unset (the tower stage keeps target_num tokens per "
        f"image)",
    )
    patch_qwen(model, target_num, name="Qwen3.5", processor_class="Qwen3VLProcessor", llm_stage=False, **kwargs)


FAMILY = Family("qwen3_5", seams.qwen3_5_classes, patch_qwen3_5, unpatch_qwen2_vl)

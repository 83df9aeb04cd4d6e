"""Where FlowCut sees q, k and v: inside the model's own attention call, not in its projections.

HF attention blocks hand their per-head q, k, v — split into heads, after any rotary embedding the
block applies (Qwen2-VL's vision tower), exactly as the attention kernel uses them — to a function
looked up by name in transformers' ``ALL_ATTENTION_FUNCTIONS`` (the ``AttentionInterface``).
FlowCut registers one more name, ``"flowcut"``: it records the call's q/k/v and scale for the block
being scored, then runs the implementation the model was configured with (SDPA, flash, eager, …), so
the S×S matrix is never built by FlowCut. The name is selected on one model instance (its config)
for the length of one pruned run (:func:`capturing`) and restored after it; other instances and the
classes never see it. The run's :class:`Capture` travels on that config too (the attention modules hold it as
``module.config``), so nothing global is involved and ``torch.compile`` traces the whole run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from . import seams

NAME = "flowcut"


@dataclass
class Capture:
    """One pruned run: the configured implementation, the block to record, what it saw.

    watch: the attention module whose next call is recorded (None: record nothing).
    seen: (query, key, value) (B, H, S, D) each, and ``scaling``, of the watched module's last call.
    calls: None (the default: not kept), or a list the user sets to collect every call of the watched module, in
        order, as ``seen`` (for a block that calls the attention once per image, as Qwen2-VL's vision tower does
        without flash attention).
    key_mask: the loop's (B, 1, 1, S) padding mask of the layer now running, for blocks that pass the attention
        no mask of their own (ViT/DINOv2 layers in transformers 5.0 take none); a block's own mask wins.
    """

    implementation: str
    watch: nn.Module | None = None
    seen: tuple[Tensor, Tensor, Tensor, float] | None = None
    calls: list[tuple[Tensor, Tensor, Tensor, float]] | None = None
    key_mask: Tensor | None = None


#: The config attribute that holds the run's :class:`Capture` while :func:`capturing` is active.
_RUN = "_flowcut_capture"


def flowcut_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """The registered ``"flowcut"`` attention: record q/k/v of the watched block, then run the real one."""
    run = getattr(getattr(module, "config", None), _RUN, None)
    implementation = run.implementation if run is not None else "sdpa"
    if run is not None and module is run.watch:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", module.head_dim**-0.5)
        run.seen = (query, key, value, scaling)
        if run.calls is not None:
            run.calls.append(run.seen)
    if attention_mask is None and run is not None:
        attention_mask = run.key_mask
    return seams.attention_function(module, implementation)(module, query, key, value, attention_mask, **kwargs)


seams.register_attention(NAME, flowcut_attention)


@contextmanager
def capturing(config):
    """Select ``"flowcut"`` on ``config`` (one model instance's) for the block; yields the :class:`Capture`."""
    prior, outer = seams.attention_implementation(config), getattr(config, _RUN, None)
    run = Capture(outer.implementation if outer is not None else prior or "eager")
    setattr(config, _RUN, run)
    seams.select_attention(config, NAME)
    try:
        with seams.stock_capture_off():  # the layers run here are not a stock forward's
            yield run
    finally:
        seams.select_attention(config, prior)
        if outer is None:
            delattr(config, _RUN)
        else:
            setattr(config, _RUN, outer)

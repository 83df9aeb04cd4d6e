"""The ``flowcut`` key of a served model's config: ``{"target_num": K, "backend": "auto"}`` (docs/vllm.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_int, require

#: The keys ``flowcut`` takes.
KEYS = ("target_num", "backend")


@dataclass(frozen=True)
class Options:
    """target_num: K, the tokens each image keeps (min(K, G₀) for an image of G₀ merge groups); backend: the ops
    backend ("auto" picks by device and dtype)."""

    target_num: int
    backend: str = "auto"


def options(hf_config) -> Options | None:
    """The checked ``flowcut`` options of ``hf_config`` (set by ``hf_overrides`` or config.json), or None without the
    key (the model runs as stock vLLM). Errors name the key: ``flowcut.target_num``."""
    raw = getattr(hf_config, "flowcut", None)
    if raw is None:
        return None
    require(isinstance(raw, dict), f"flowcut must be a dict such as {{'target_num': 64}}, got {raw!r}")
    unknown = sorted(set(raw) - set(KEYS))
    require(not unknown, f"flowcut.{unknown[0] if unknown else ''} is not a FlowCut option; the options are "
                         f"{', '.join('flowcut.' + k for k in KEYS)}")
    require("target_num" in raw, "flowcut.target_num is required: the tokens each image keeps, e.g. "
                                 "hf_overrides={'flowcut': {'target_num': 64}}")
    backend = raw.get("backend", "auto")
    require(isinstance(backend, str), f"flowcut.backend must be a backend name such as 'auto', got {backend!r}")
    return Options(check_int("flowcut.target_num", raw["target_num"], 1), backend)

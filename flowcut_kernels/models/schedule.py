"""The static schedule: FlowCut with each layer's token count fixed in advance (docs/semantics.md, "Static schedule").

FlowCut's adaptive schedule reads each prune step's entropy on the host to decide how many tokens to keep, so the
shapes after a prune are known only at run time. :func:`calibrate_schedule` runs the adaptive schedule on
calibration images and fixes those counts (:class:`StaticSchedule`); :class:`StaticPolicy` then prunes with them:
scores, their accumulation and the selection stay FlowCut's, only the count is given. A pass makes no host read,
and ``torch.compile(fullgraph=True)`` or a CUDA graph can capture it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import FlowCutInputError, check_int, require
from .policy import LayerView
from .registry import find_tower
from .tower import Tower

#: How a layer's count is taken over the calibration images: the (lower) median of the adaptive counts.
STATISTIC = "median"


@dataclass(frozen=True)
class StaticSchedule:
    """Token counts for a tower pass, fixed in advance.

    counts: F + 1 ints: the patches (relay row excluded) layer i = 0 … F processes; counts[0] = N₀ (the tower's
        patches), non-increasing, counts[F] = target_num (F = the feature layer, 0-based).
    tower: the calibrated tower's config class, layer count and width, checked on use ("CLIPVisionConfig", 24,
        1024).
    feature_layer: the negative feature layer it was calibrated for (F = layers + feature_layer).
    images: how many calibration images the counts come from; statistic: how (:data:`STATISTIC`).
    """

    counts: tuple[int, ...]
    tower: tuple[str, int, int]
    feature_layer: int
    images: int = 0
    statistic: str = STATISTIC

    def __post_init__(self):
        counts = self.counts
        require(isinstance(counts, (tuple, list)) and len(counts) >= 2
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts),
                f"counts must be at least two positive ints (layers 0 … F), got {counts!r}")
        require(all(a >= b for a, b in zip(counts, counts[1:])),
                f"counts must not rise from one layer to the next, got {list(counts)}")
        require(counts[-1] < counts[0], f"counts must end below the tower's {counts[0]} patches, got {list(counts)}")
        name, layers, width = self.tower
        require(len(counts) == layers + self.feature_layer + 1,
                f"counts has {len(counts)} entries, but a {layers}-layer tower with feature_layer={self.feature_layer}"
                f" runs {layers + self.feature_layer + 1} layers (0 … F)")
        object.__setattr__(self, "counts", tuple(counts))
        object.__setattr__(self, "tower", (str(name), int(layers), int(width)))

    @property
    def target_num(self) -> int:
        return self.counts[-1]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StaticSchedule:
        try:
            fields = json.loads(text)
            return cls(tuple(fields["counts"]), tuple(fields["tower"]), fields["feature_layer"],
                       fields.get("images", 0), fields.get("statistic", STATISTIC))
        except (ValueError, KeyError, TypeError) as error:
            raise FlowCutInputError(f"not a StaticSchedule's JSON ({error}); make one with StaticSchedule.to_json()")

    def check(self, tower: Tower, feature_idx: int, target_num: int, argument: str = "schedule") -> None:
        """Refuse this schedule for another tower, feature layer or target (FlowCutInputError naming ``argument``)."""
        here = signature(tower)
        require(self.tower == here,
                f"{argument} was calibrated on a tower of {self.tower[0]} with {self.tower[1]} layers of width "
                f"{self.tower[2]}, not this one of {here[0]} with {here[1]} layers of width {here[2]}: calibrate one "
                f"for this model with flowcut_kernels.calibrate_schedule")
        require(len(self.counts) == feature_idx + 1 and self.counts[0] == tower.num_patches,
                f"{argument} covers layers 0 … {len(self.counts) - 1} of {self.counts[0]} patches, but this pass runs "
                f"layers 0 … {feature_idx} of {tower.num_patches}: calibrate it with the same feature_layer and "
                f"image size")
        require(self.target_num == target_num,
                f"{argument} ends at {self.target_num} tokens, not target_num={target_num}: pass target_num="
                f"{self.target_num}, or calibrate a schedule for {target_num}")


def signature(tower: Tower) -> tuple[str, int, int]:
    """What a schedule records of the tower it was calibrated on (its config's class: the same in every release)."""
    return type(tower.core.config).__name__, len(tower.layers), int(tower.core.config.hidden_size)


def refuse_schedule(schedule, family: str) -> None:
    """A family whose tower has no static-schedule support refuses one (before changing anything)."""
    require(schedule is None, f"schedule: a static schedule is supported for CLIP/SigLIP towers and LLaVA-1.5, not "
                              f"{family}; leave it unset (the adaptive schedule)")


def check_schedule(schedule, tower: Tower, feature_idx: int, target_num: int) -> StaticSchedule | None:
    """``schedule`` (None, or a :class:`StaticSchedule` for this tower, feature layer and target), checked."""
    if schedule is None:
        return None
    require(isinstance(schedule, StaticSchedule),
            f"schedule must be a flowcut_kernels.StaticSchedule (from calibrate_schedule), got "
            f"{type(schedule).__name__}")
    schedule.check(tower, feature_idx, target_num)
    return schedule


class StaticPolicy:
    """FlowCut with the counts of a :class:`StaticSchedule`: every layer before the last prune is scored (the
    cumulative score as FlowCut's); after layer i the best ``counts[i + 1]`` patches stay (relay kept). The same
    counts for every image, so the batch stays dense, and nothing is read from the device."""

    def __init__(self, schedule: StaticSchedule, has_cls: bool):
        self.counts = schedule.counts
        self.relay = int(has_cls)
        self.last_prune = max(i for i in range(len(self.counts) - 1) if self.counts[i + 1] < self.counts[i])

    def plan(self, index: int, steps_left: int, lengths: list[int]) -> tuple[bool, bool]:
        return index <= self.last_prune, self.counts[index + 1] < self.counts[index]

    def step(self, layer: LayerView) -> tuple[Tensor, list[int] | None]:
        cum, _, _ = ops.flow_scores(layer.relay_query(), layer.k, layer.v, layer.prev, scale=layer.scale,
                                    has_cls=layer.has_cls, backend=layer.backend)
        after = self.counts[layer.index + 1]
        return cum, ([after + self.relay] * len(layer.lengths) if after < self.counts[layer.index] else None)


def calibrate_schedule(
    tower_or_model: nn.Module,
    pixel_values: Tensor,
    target_num: int,
    *,
    feature_layer: int | None = None,
    backend: str = "auto",
) -> StaticSchedule:
    """Fix FlowCut's per-layer counts from calibration images.

    Args:
        tower_or_model: a CLIP/SigLIP vision model, or a LLaVA model (its tower and ``vision_feature_layer``).
        pixel_values: (B, 3, H, W) calibration images, as the model's image processor makes them.
        target_num: the patches kept per image at the feature layer.
        feature_layer: negative feature layer; default -1 for a tower, the config's for a LLaVA model.
        backend: as for :func:`~flowcut_kernels.encode`.

    Returns:
        A :class:`StaticSchedule`: for each layer the median over the images of the adaptive schedule's count
        (each image on its own schedule, as if alone), made non-increasing (each count at most the one before),
        ending at target_num.
    """
    from .encoder import encode
    from .llava import is_llava, llava_core, llava_tower
    from .vlm import feature_layer_of

    if is_llava(tower_or_model):
        core = llava_core(tower_or_model)
        tower = llava_tower(core)
        configured = feature_layer_of(core.config.vision_feature_layer, len(tower.layers))
        require(feature_layer in (None, configured),
                f"feature_layer={feature_layer} differs from the model's vision_feature_layer; leave it unset")
        feature_layer, model = configured, core.vision_tower
    else:
        model, feature_layer = tower_or_model, -1 if feature_layer is None else feature_layer
    check_int("target_num", target_num, 1)
    tower = find_tower(model, "tower_or_model")
    out = encode(model, pixel_values, target_num, feature_layer=feature_layer, schedule="per_image", backend=backend)
    counts = torch.tensor(out.tokens_per_layer) - tower.prefix  # (B, F + 1)
    counts = counts.median(dim=0).values.cummin(dim=0).values.clamp(min=target_num)
    counts[-1] = target_num
    return StaticSchedule(tuple(counts.tolist()), signature(tower), feature_layer, len(pixel_values))

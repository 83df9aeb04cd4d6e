"""The FlowCut encoder: run layers 0…F, score each from its own q/k/v, prune progressively.

CLIP towers use the CLS variant of docs/semantics.md (relay = the CLS row's query), SigLIP towers the mean-query
variant (relay = the mean query over the image's tokens, taken in float32, or float64 for a float64 model).

The layers run exactly as the model defines them, with its own attention implementation
(SDPA by default): the scores come from the q/k/v each attention call receives (:mod:`.attention`),
so the S×S attention matrix is never built. Layers after the feature layer F are not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import INPUT_DTYPES, FlowCutInputError, check_int, check_tensor, require
from .attention import capturing
from .policy import FlowCutPolicy, LayerView, Policy
from .registry import find_tower
from .schedule import StaticPolicy, StaticSchedule, check_schedule
from .tower import Tower


@dataclass
class FlowCutOutput:
    """What :func:`encode` returns.

    features: (B, target_num, C) output of the feature layer for the kept patches (CLS row dropped).
    keep_indices: (B, target_num) int64, ascending, original patch numbering (0 … N₀ − 1).
    tokens_per_layer: tokens (CLS included, if any) each run layer 0 … F processed; with the per-image
        schedule one such list per image.
    """

    features: Tensor
    keep_indices: Tensor
    tokens_per_layer: list


def feature_index(feature_layer: int, num_layers: int, argument: str = "feature_layer") -> int:
    """F = L + feature_layer, for a negative ``feature_layer`` that leaves at least one layer before F."""
    require(
        isinstance(feature_layer, int) and not isinstance(feature_layer, bool),
        f"{argument} must be an int, got {type(feature_layer).__name__}",
    )
    require(
        -num_layers < feature_layer < 0,
        f"{argument}={feature_layer} is out of range for a {num_layers}-layer encoder: pass a negative index in "
        f"[{1 - num_layers}, -1], counted from the end like LLaVA's vision_feature_layer (-1 = last layer, "
        f"-2 = LLaVA-1.5); the first layer cannot be the feature layer, since no layer before it could prune",
    )
    return num_layers + feature_layer


def check_target(target_num: int, num_patches: int, argument: str = "target_num") -> int:
    """1 ≤ target_num < N₀ (errors name ``argument``)."""
    return check_int(argument, target_num, 1, num_patches - 1)


#: The ops the per-image schedule runs on.
PACKED_OPS = ("flow_scores_varlen", "select_gather_varlen")


class Ragged:
    """Images of different lengths padded into one (B, S_max, …) batch: the per-image schedule's layout.

    lens: each image's rows (its first lens[b] rows are real; the rest are padding no real row attends to).
    """

    def __init__(self, lens: list[int], device: torch.device):
        self.lens, self.device = list(lens), device
        self.width = max(self.lens)
        # Built on the host from the known lengths and copied once: nothing is read back from the device.
        rows = torch.cat([torch.arange(b * self.width, b * self.width + n) for b, n in enumerate(self.lens)])
        self.rows = rows.to(device, non_blocking=True)
        self.cu_seqlens = torch.tensor([0, *self.lens]).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)
        self._masks: dict[torch.dtype, Tensor] = {}

    def key_mask(self, dtype: torch.dtype) -> Tensor | None:
        """(B, 1, 1, S_max) additive mask hiding each image's padding keys; None when nothing is padded. Built once
        per layout and dtype (the layers between two prune steps share it)."""
        if min(self.lens) == self.width:
            return None
        if dtype not in self._masks:
            padding = torch.arange(self.width)[None, :] >= torch.tensor(self.lens)[:, None]
            mask = torch.zeros(padding.shape, dtype=dtype).masked_fill(padding, torch.finfo(dtype).min)
            self._masks[dtype] = mask[:, None, None, :].to(self.device, non_blocking=True)
        return self._masks[dtype]

    def pack(self, x: Tensor) -> Tensor:
        """(B, S_max, *rest) → (T, *rest): the real rows, image by image."""
        return x.flatten(0, 1)[self.rows]

    def unpack(self, packed: Tensor) -> Tensor:
        """(T, *rest) → (B, S_max, *rest), zeros in the padding."""
        out = packed.new_zeros(len(self.lens) * self.width, *packed.shape[1:])
        out[self.rows] = packed
        return out.unflatten(0, (len(self.lens), self.width))


def run_pruned(
    tower: Tower,
    hidden: Tensor,
    policy: Policy,
    feature_idx: int,
    backend: str,
    layer_outputs: list | None = None,
    per_image: bool = False,
    **layer_kwargs,
) -> tuple[Tensor, Tensor, list]:
    """Run layers 0 … F of ``tower`` on ``hidden``, pruning where ``policy`` says.

    Args:
        hidden: (B, S₀, C) input of layer 0.
        policy: the scoring policy (:class:`~flowcut_kernels.models.policy.FlowCutPolicy` for FlowCut).
        feature_idx: F, 0-based index of the feature layer.
        backend: a concrete backend name.
        layer_outputs: if a list, each run layer's whole output is appended (before that step's
            pruning; per image: a list of B tensors (S_b, C)); otherwise a pruning step drops tokens
            before the layer's MLP.
        per_image: the policy sees the images packed and may give each its own count (per-image schedules),
            all in one pass: the images are padded to the longest, their padding hidden from attention by a
            key mask. Otherwise a dense batch with one count.

    Returns:
        out (B, K, C) output of layer F (relay row first in the CLS variant, then the tower's R registers),
        keep_indices (B, K − has_cls − R) int64 ascending, tokens_per_layer: F + 1 ints, registers included (per
        image: B such lists).

    The registers (rows 1 … R) run through every layer and are kept, but the policy never sees them: its q/k/v,
    lengths and the rows it selects from are the relay row and the patches.
    """
    has_cls, regs = tower.has_cls, tower.num_registers
    batch, seq, _ = hidden.shape
    n = seq - tower.prefix
    index_map = torch.arange(n, device=hidden.device).expand(batch, n)
    ragged = Ragged([seq] * batch, hidden.device) if per_image else None
    if per_image:
        index_map = index_map.flatten()
    gather_varlen = ops.unchecked("select_gather_varlen", backend) if per_image else None  # inputs built here
    scores = None
    tokens = []
    with capturing(tower.core.config) as run:
        for i, layer in enumerate(tower.layers[:feature_idx]):
            lens = ragged.lens if per_image else [seq]
            tokens.append(list(lens) if per_image else seq)
            steps_left = feature_idx - i - 1
            seen = [s - regs for s in lens]  # the rows the policy sees: relay and patches
            scored, prunes = policy.plan(i, steps_left, seen)
            # A pruning step drops tokens before the layer's MLP: the scores need only q/k/v, and the
            # MLP acts on each row alone, so the kept rows come out exactly as from the whole layer.
            # (Not when every layer's full output is asked for, nor for a tower whose layers run whole.)
            prune_first = tower.splits_layers and scored and prunes and layer_outputs is None
            mask = ragged.key_mask(hidden.dtype) if per_image else None
            attn = tower.attention(layer)
            run.watch, run.seen, run.key_mask = (attn if scored else None), None, mask
            if prune_first:
                attended, _ = attn(hidden_states=layer.layer_norm1(hidden), attention_mask=mask, **layer_kwargs)
                hidden = hidden + attended
            else:
                hidden = tower.run_layer(layer, hidden, mask, **layer_kwargs)
            if layer_outputs is not None:
                layer_outputs.append([h[:s] for h, s in zip(hidden, lens)] if per_image else hidden)
            if scored:
                # (B, H, S, D) each, as the attention used them, the registers' rows taken out
                q, k, v = (_without_registers(x, regs, 2) for x in run.seen[:3])
                scale = run.seen[3]
                scoring = Ragged(seen, hidden.device) if per_image and regs else ragged
                if per_image:
                    k, v = (scoring.pack(x.transpose(1, 2)) for x in (k, v))  # (T, H, D)
                view = LayerView(i, steps_left, q, k, v, scale, has_cls, seen,
                                 scoring.cu_seqlens if per_image else None, scores, backend)
                scores, keep = policy.step(view)
                if keep is not None:
                    keep = [keep] if isinstance(keep, int) else list(keep)
                    require(len(keep) == len(seen) and all(1 <= x <= s for x, s in zip(keep, seen)),
                            f"the policy kept {keep} rows of images with {seen} rows after layer {i}")
                if keep is not None and per_image and keep != seen:
                    kept, scores, index_map, _ = gather_varlen(
                        scoring.pack(_without_registers(hidden, regs, 1)), scores, index_map, scoring.cu_seqlens,
                        keep, has_cls,
                    )
                    hidden = _with_registers(Ragged(keep, hidden.device).unpack(kept), hidden, regs)
                    ragged = Ragged([x + regs for x in keep], hidden.device)
                elif keep is not None and not per_image and keep[0] < seen[0]:
                    kept, scores, index_map = ops.select_gather(
                        _without_registers(hidden, regs, 1), scores, index_map, keep[0], has_cls=has_cls,
                        backend=backend,
                    )
                    hidden = _with_registers(kept, hidden, regs)
                    seq = keep[0] + regs
            if prune_first:
                hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        run.watch = run.seen = run.key_mask = None
        if per_image:
            require(len(set(ragged.lens)) == 1, f"the policy left the images with different token counts "
                                                f"{ragged.lens}; every image must end with the same count")
        tokens.append(list(ragged.lens) if per_image else seq)
        # inside: no stock capture (seams)
        hidden = tower.run_layer(tower.layers[feature_idx], hidden, None, **layer_kwargs)
    if layer_outputs is not None:
        layer_outputs.append(list(hidden) if per_image else hidden)
    if per_image:
        index_map = index_map.view(batch, -1)
        tokens = [[t[b] for t in tokens] for b in range(batch)]
    return hidden, index_map, tokens


def _without_registers(x: Tensor, regs: int, dim: int) -> Tensor:
    """``x`` without its rows 1 … ``regs`` along ``dim`` (the registers after the CLS row); ``x`` itself if none."""
    if not regs:
        return x
    return torch.cat((x.narrow(dim, 0, 1), x.narrow(dim, 1 + regs, x.shape[dim] - 1 - regs)), dim)


def _with_registers(kept: Tensor, hidden: Tensor, regs: int) -> Tensor:
    """(B, K, C) kept rows (CLS first) with ``hidden``'s (B, ·, C) register rows 1 … ``regs`` put back after the CLS
    row: (B, K + regs, C)."""
    if not regs:
        return kept
    return torch.cat((kept[:, :1], hidden[:, 1:1 + regs], kept[:, 1:]), 1)


def check_pixels(pixel_values: Tensor, tower: Tower) -> None:
    """(B, 3, H, W) floating pixels on the tower's device."""
    require(
        not isinstance(pixel_values, Tensor) or pixel_values.is_floating_point(),
        f"pixel_values has dtype {getattr(pixel_values, 'dtype', None)}: raw image values? Pass images through the "
        f"model's image processor (it resizes, rescales and normalises them to float pixel_values)",
    )
    check_tensor("pixel_values", pixel_values, 4, INPUT_DTYPES, "(B, 3, H, W)")
    require(
        pixel_values.device == tower.device,
        f"pixel_values is on {pixel_values.device} but the model is on {tower.device}; "
        f"move it with pixel_values.to({str(tower.device)!r})",
    )


def encode(
    vision_model: nn.Module,
    pixel_values: Tensor,
    target_num: int,
    *,
    feature_layer: int = -1,
    schedule: str | StaticSchedule = "batch",
    backend: str = "auto",
    policy: Policy | None = None,
) -> FlowCutOutput:
    """Encode images with FlowCut pruning, returning ``target_num`` patch features per image.

    The features are the feature layer's raw output (no post-layernorm), as LLaVA takes them from
    ``hidden_states[vision_feature_layer]``.

    Args:
        vision_model: a HF ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``ViTModel``, ``Dinov2Model`` or
            ``Dinov2WithRegistersModel`` (CLS variant; registers are kept, never features), or a
            ``SiglipVisionModel`` (mean-query variant: no CLS row, the target_num kept tokens are the features).
        pixel_values: (B, 3, H, W) images at the model's resolution.
        target_num: patches to keep, 1 ≤ target_num < N₀ (576 for ViT-L/14-336).
        feature_layer: negative layer index whose output is the feature (-1 last; LLaVA-1.5 uses -2).
        schedule: "batch" — one schedule for the batch (each prune count the maximum over its images);
            "per_image" — each image on its own schedule, as if encoded alone, all in one pass (the images'
            token counts differ between prune steps: padded, with their padding masked from attention);
            a :class:`~flowcut_kernels.StaticSchedule` — the counts fixed in advance (from
            :func:`~flowcut_kernels.calibrate_schedule`): no host read, ``torch.compile(fullgraph=True)`` works.
        backend: "auto" or a name from :func:`flowcut_kernels.available_backends`.
        policy: another pruning method for the same loop (:class:`~flowcut_kernels.models.policy.Policy`); it
            must leave ``target_num`` patches per image. Default: FlowCut.

    Returns:
        A :class:`FlowCutOutput`: features (B, target_num, C), keep_indices (B, target_num),
        tokens_per_layer (per image with "per_image").
    """
    tower = find_tower(vision_model, "vision_model")
    feature_idx = feature_index(feature_layer, len(tower.layers))
    target_num = check_target(target_num, tower.num_patches)
    check_pixels(pixel_values, tower)
    static = schedule if isinstance(schedule, StaticSchedule) else None
    if static is None and schedule not in ("batch", "per_image"):
        raise FlowCutInputError(f"schedule={schedule!r} is not one of 'batch', 'per_image' or a StaticSchedule")
    check_schedule(static, tower, feature_idx, target_num)
    require(static is None or policy is None, "pass a static schedule or a policy, not both")
    per_image = schedule == "per_image"
    backend = ops.resolve_backend(backend, tower.device, tower.dtype, PACKED_OPS if per_image else ())
    hidden = tower.embed(pixel_values)
    if static is not None:
        policy = StaticPolicy(static, tower.has_cls)
    elif policy is None:
        policy = FlowCutPolicy(target_num, tower.has_cls)
    out, keep_indices, tokens = run_pruned(tower, hidden, policy, feature_idx, backend, per_image=per_image)
    require(keep_indices.shape[1] == target_num,
            f"the policy left {keep_indices.shape[1]} patches per image, not target_num={target_num}")
    features = out[:, tower.prefix:]
    return FlowCutOutput(features, keep_indices, tokens)

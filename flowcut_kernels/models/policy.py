"""Scoring policies: what the pruned-encoder loop asks after each layer's attention.

The loop (:func:`~flowcut_kernels.models.encoder.run_pruned`) runs a tower's layers, hands each layer's own
q/k/v to a policy, and keeps the rows the policy's scores rank highest. FlowCut is the default policy
(:class:`FlowCutPolicy`); another method is a class with the two methods of :class:`Policy`, and gets the
same machinery: the model's own attention kernel, no S×S matrix, batches on one schedule or per-image
schedules in one padded pass, the relay (CLS) row kept, the scores carried with their tokens, layers
after the feature layer not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .. import ops


@dataclass
class LayerView:
    """One layer's attention inputs, as the policy sees them after the layer ran.

    index, steps_left: the layer (0-based) and the layers F − index − 1 left before the feature layer F.
    q, k, v: the layer's per-head queries, keys and values as its attention used them. Dense batch: (B, H, S, D)
        each. Per-image schedules: q is (B, H, S_max, D) padded; k and v are packed (T, H, D) by cu_seqlens.
    scale: the attention's scale. has_cls: row 0 of each image is a CLS relay (never a candidate).
    lengths: each image's rows (relay included). cu_seqlens: (B + 1,) int32 for the packed layout, else None.
    prev: the policy's last scores, gathered with the rows kept since: (B, N) dense, (T_c,) packed; or None.
    backend: the ops backend to use.
    """

    index: int
    steps_left: int
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    has_cls: bool
    lengths: list[int]
    cu_seqlens: Tensor | None
    prev: Tensor | None
    backend: str

    def relay_query(self) -> Tensor:
        """(B, H, D): the CLS row's query, or (no CLS) the mean query over each image's real rows in float32."""
        if self.has_cls:
            return self.q[:, :, 0]
        dtype = torch.promote_types(self.q.dtype, torch.float32)
        if self.cu_seqlens is None:
            return self.q.mean(dim=2, dtype=dtype)
        lengths = torch.tensor(self.lengths, device=self.q.device)
        real = torch.arange(self.q.shape[2], device=self.q.device) < lengths[:, None]
        total = (self.q.to(dtype) * real[:, None, :, None]).sum(dim=2)
        return total / lengths.to(dtype)[:, None, None]


def scheduled_keep(
    entropy: Tensor, sizes: list[int], finals: list[int], steps_left: int, *, relay: int, rule_target: int
) -> list[int] | None:
    """FlowCut's schedule rule, image by image (docs/semantics.md, "Schedule"): the rows each image keeps after a
    layer with ``steps_left`` prune steps after it, or None where the layer does not prune (odd ``steps_left``).

    The last step (``steps_left`` = 0) keeps ``finals`` (no host read). Before it, an image above its final count
    drops prune = round_half_to_even((N − (rule_target − 1)) / √rpl · (1 − Hn²)) (``ops.prune_counts``: every image
    from one host read) and keeps max(size − prune, final). The batch rule is the fewest of these (the rounding is
    monotone, so the minimum keep is the one of the batch's maximum budget).

    Args:
        entropy: (B,) each image's normalised entropy Hn at this layer.
        sizes: each image's rows (relay row included); finals: the rows each keeps at the end (relay included).
        relay: 1 when each image's row 0 is a relay (not a candidate: N = size − 1), else 0 (N = size).
        rule_target: the T of the prune count (the CLS variant's target_num + 1; see the family's recipe).
    """
    if steps_left % 2:
        return None
    if steps_left == 0:
        return list(finals)
    keep = list(sizes)
    live = [b for b, (size, final) in enumerate(zip(sizes, finals)) if size > final]
    if live:
        values = entropy if len(live) == len(sizes) else entropy[live]
        prunes = ops.prune_counts(values, [sizes[b] - relay for b in live], rule_target, steps_left)
        for b, prune in zip(live, prunes):
            keep[b] = max(sizes[b] - prune, finals[b])
    return keep


class Policy(Protocol):
    """A pruning method for the encoder loop."""

    def plan(self, index: int, steps_left: int, lengths: list[int]) -> tuple[bool, bool]:
        """Before layer ``index`` runs: (score it?, may it prune?). A pruning layer drops rows before its MLP."""

    def step(self, layer: LayerView) -> tuple[Tensor, list[int] | None]:
        """Scores of the candidates ((B, N) float32 dense, (T_c,) packed; higher stays) and the rows each image
        keeps after this layer (relay included), or None to keep all. The scores travel with their rows and come
        back as the next ``LayerView.prev``. Every image must end with the same count."""


class FlowCutPolicy:
    """FlowCut (docs/semantics.md): cumulative flow scores, entropy-set prune counts, target_num rows at the end."""

    def __init__(self, target_num: int, has_cls: bool):
        self.target = target_num + 1 if has_cls else target_num

    def plan(self, index: int, steps_left: int, lengths: list[int]) -> tuple[bool, bool]:
        scored = max(lengths) > self.target
        return scored, scored and steps_left % 2 == 0

    def step(self, layer: LayerView) -> tuple[Tensor, list[int] | None]:
        first = int(layer.has_cls)
        if layer.cu_seqlens is None:
            cum, entropy, _ = ops.flow_scores(
                layer.relay_query(), layer.k, layer.v, layer.prev, scale=layer.scale, has_cls=layer.has_cls,
                backend=layer.backend,
            )
        else:  # unchecked: the loop built cu_seqlens itself (no checks, no host read)
            cum, entropy, _ = ops.unchecked("flow_scores_varlen", layer.backend)(
                layer.relay_query(), layer.k, layer.v, layer.cu_seqlens, layer.prev, float(layer.scale),
                layer.has_cls, True,
            )
        dense = layer.cu_seqlens is None
        sizes = layer.lengths * len(entropy) if dense else layer.lengths
        keep = scheduled_keep(entropy, sizes, [self.target] * len(sizes), layer.steps_left, relay=first,
                              rule_target=self.target)
        if keep is None:
            return cum, None
        return cum, [min(keep)] if dense else keep  # the batch rule: one count for all

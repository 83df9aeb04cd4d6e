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
        else:  # the backend's op directly: the loop built cu_seqlens itself (no checks, no host read)
            cum, entropy, _ = ops.BACKENDS[layer.backend].ops["flow_scores_varlen"](
                layer.relay_query(), layer.k, layer.v, layer.cu_seqlens, layer.prev, float(layer.scale),
                layer.has_cls, True,
            )
        if layer.steps_left % 2:
            return cum, None
        if layer.steps_left == 0:  # the last step keeps the target: nothing to read
            return cum, [self.target] * len(layer.lengths)
        if layer.cu_seqlens is None:  # the batch rule: one count for all, one host read
            seq = layer.lengths[0]
            return cum, [max(seq - ops.prune_count(entropy, seq - first, self.target, layer.steps_left), self.target)]
        prunes = ops.prune_counts(  # every image's count from one host read
            entropy, [s - first for s in layer.lengths], self.target, layer.steps_left
        )
        return cum, [max(s - p, self.target) for s, p in zip(layer.lengths, prunes)]

"""Gating per model family: router logits -> softmax top-k (renormalised where the family says)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.config import ModelSpec
from kernels.dispatch import KernelOps


@dataclass(slots=True)
class Route:
    """The experts chosen for each of T tokens at one layer."""

    ids: torch.Tensor  # [T, K] int64 global expert ids, descending gate weight
    weights: torch.Tensor  # [T, K] float32 combine weights


class Gate:
    """Applies each MoE layer's router; `weights[l]` is [E, H] (None on dense layers)."""

    def __init__(self, spec: ModelSpec, weights: list[torch.Tensor | None], ops: KernelOps) -> None:
        self.spec, self.weights, self.ops = spec, weights, ops
        # Mixtral combines with float32 weights; the other families round them to the hidden dtype
        self.round_weights = spec.family != "mixtral"

    def route(self, layer: int, x: torch.Tensor) -> Route:
        """x: [T, H] post-attention-normed hidden states of `layer`."""
        logits = self.ops.linear(x, self.weights[layer])  # [T, E]
        weights, ids = self.ops.topk_gating(logits, self.spec.top_k, self.spec.norm_topk_prob)
        if self.round_weights:
            weights = weights.to(x.dtype).float()
        return Route(ids=ids, weights=weights)

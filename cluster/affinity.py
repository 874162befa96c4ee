"""AffinityTally: the routing statistics expert grouping needs, counted inside an attention worker.

Per MoE layer, co-activation ([E, E]: tokens routed to both experts; diagonal zero) and transitions
between consecutive MoE layers ([E, E]: tokens at expert a in one MoE layer and at expert b in the
next). Counted as the routes are made and fetched in bulk when the placement is re-planned, so
the per-step control traffic does not grow with E^2.
"""

from __future__ import annotations

import numpy as np
import torch


class AffinityTally:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.coactivation: dict[int, torch.Tensor] = {}
        self.transitions: dict[int, torch.Tensor] = {}  # keyed by the earlier MoE layer
        self._prev: list[tuple[int, torch.Tensor] | None] = []  # per micro-batch: (layer, [T, E] one-hot)

    def new_step(self, microbatches: int) -> None:
        self._prev = [None] * microbatches

    def add(self, microbatch: int, layer: int, ids: torch.Tensor) -> None:
        """ids: [T, K] the experts of one micro-batch's tokens at MoE `layer` (layers in order)."""
        hot = torch.zeros(ids.shape[0], self.num_experts).scatter_(1, ids.cpu(), 1.0)  # [T, E]
        co = hot.T @ hot
        co.fill_diagonal_(0)
        self.coactivation[layer] = self.coactivation.get(layer, 0) + co
        prev = self._prev[microbatch]
        if prev is not None:
            self.transitions[prev[0]] = self.transitions.get(prev[0], 0) + prev[1].T @ hot
        self._prev[microbatch] = (layer, hot)

    def take(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        co = {layer: t.numpy() for layer, t in self.coactivation.items()}
        tr = {layer: t.numpy() for layer, t in self.transitions.items()}
        self.coactivation, self.transitions = {}, {}
        return co, tr

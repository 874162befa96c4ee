"""Decode steps of a routing trace and the route predictions the cache replay shares (torch-free).

A step is one token of every request (in position order); at each MoE layer it needs the union of
its tokens' experts. Predictions for layer l+1 are made once layer l is routed, by the inter-layer
affinity x previous-route mixture, learning online from the routes seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from router.predictors import AffinityPredictor, MixturePredictor, PreviousRoutePredictor, RouteContext
from router.traces import RouteRecord


@dataclass(frozen=True, slots=True)
class Step:
    """One decode step: at each layer, the experts its tokens need with their summed gate weights."""

    tokens: tuple[tuple[str, int], ...]  # (request, position)
    needs: tuple[dict[int, float], ...]  # [L] expert -> gate weight summed over the step's tokens
    counts: tuple[dict[int, int], ...]  # [L] expert -> how many of the step's tokens it gets
    routes: tuple[dict[int, tuple[int, ...]], ...]  # per token: layer -> experts


def decode_steps(records: Iterable[RouteRecord]) -> tuple[list[Step], int, int]:
    """Records -> (steps in decode order, num_layers, num_experts)."""
    by_token: dict[tuple[str, int], dict[int, tuple[tuple[int, ...], tuple[float, ...]]]] = {}
    layers = experts = 0
    for r in records:
        by_token.setdefault((r.request, r.pos), {})[r.layer] = (r.experts, r.weights)
        layers, experts = max(layers, r.layer + 1), max(experts, max(r.experts) + 1)
    order = {req: i for i, req in enumerate(dict.fromkeys(req for req, _ in by_token))}
    steps: dict[int, list[tuple[str, int]]] = {}
    for req, pos in sorted(by_token, key=lambda t: (t[1], order[t[0]])):
        steps.setdefault(pos, []).append((req, pos))
    out = []
    for _, tokens in sorted(steps.items()):
        needs: list[dict[int, float]] = [{} for _ in range(layers)]
        counts: list[dict[int, int]] = [{} for _ in range(layers)]
        for tok in tokens:
            for layer, (ids, weights) in by_token[tok].items():
                for e, w in zip(ids, weights):
                    needs[layer][e] = needs[layer].get(e, 0.0) + w
                    counts[layer][e] = counts[layer].get(e, 0) + 1
        routes = tuple({layer: ids for layer, (ids, _) in sorted(by_token[tok].items())} for tok in tokens)
        out.append(Step(tuple(tokens), tuple(needs), tuple(counts), routes))
    return out, layers, experts


# ---- predictions (shared by every policy) --------------------------------------------------------
def predict_next(steps: list[Step], num_layers: int, num_experts: int) -> list[list[np.ndarray | None]]:
    """[step][layer] -> [E] expected uses of layer+1's experts by the step's tokens, predicted once
    layer is routed (the predictor learns online, from the routes seen so far); None at the last layer."""
    predictor = MixturePredictor([AffinityPredictor(num_layers, num_experts),
                                  PreviousRoutePredictor(num_layers, num_experts)])
    out = []
    for step in steps:
        rows: list[np.ndarray | None] = [None] * num_layers
        for layer in range(num_layers):
            total = np.zeros(num_experts)
            for (request, pos), route in zip(step.tokens, step.routes):
                if layer in route:
                    predictor.observe(request, pos, layer, route[layer])
                    seen = {l: ids for l, ids in route.items() if l <= layer}
                    scores = predictor.scores(RouteContext(request, pos, layer, seen), layer + 1)
                    if scores is not None:
                        total += scores * len(route[layer])
            rows[layer] = total if layer + 1 < num_layers else None
        out.append(rows)
    return out


def oracle_next(steps: list[Step], num_layers: int, num_experts: int) -> list[list[np.ndarray | None]]:
    """As predict_next, but the uses layer+1 will really have: a perfect predictor, the limit of what
    prefetch can do within the link's time."""
    out = []
    for step in steps:
        rows: list[np.ndarray | None] = [None] * num_layers
        for layer in range(num_layers - 1):
            row = np.zeros(num_experts)
            for e, n in step.counts[layer + 1].items():
                row[e] = n
            rows[layer] = row
        out.append(rows)
    return out

"""Route predictors (torch-free): guess a token's experts at layers l+1..l+d once layer l is routed.

One interface, `RoutePredictor`: `observe` is fed every actual routing decision as it happens,
`scores` gives a distribution over a target layer's experts (None: no opinion), and `predict` turns
scores into top-k ids per target layer. Predictors:

- `AffinityPredictor`: inter-layer affinity (ExFlow), smoothed l -> l+d transition counts learned online.
- `PreviousRoutePredictor`: the previous token of the same request, at the target layer.
- `PregatePredictor`: scores computed from the hidden state (the next layers' gates applied to the
  current hidden state); the torch side fills `RouteContext.pregate`, this class only reads it.
- `MixturePredictor`: a weighted mix of the others' scores.

Order of calls per token (decode: tokens of a request arrive one after another): for each layer l,
`observe(l)` with the actual route, then `predict(ctx at l)` for l+1..l+d.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What is known of one token right after layer `layer` was routed."""

    request: str
    pos: int
    layer: int
    route: Mapping[int, tuple[int, ...]]  # the token's actual experts at layers <= layer
    pregate: Mapping[int, Sequence[float]] | None = None  # target layer -> [E] scores from the hidden state


def top_k_ids(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """The k highest-scoring expert ids, best first (ties: lower id first)."""
    return tuple(np.argsort(-scores, kind="stable")[:k].tolist())


class RoutePredictor(ABC):
    """Base of every route predictor; subclasses give `observe` and `scores`."""

    name: str = "predictor"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        if num_layers <= 0 or num_experts <= 0:
            raise ValueError(f"num_layers and num_experts must be > 0, got {num_layers}, {num_experts}")
        self.num_layers, self.num_experts = num_layers, num_experts

    @abstractmethod
    def observe(self, request: str, pos: int, layer: int, experts: Sequence[int]) -> None:
        """The actual experts of token (request, pos) at `layer`."""

    @abstractmethod
    def scores(self, ctx: RouteContext, target: int) -> np.ndarray | None:
        """[E] non-negative, summing to 1, for layer `target` > ctx.layer; None when no opinion."""

    def finish(self, request: str) -> None:
        """The request ended: drop what is kept per request."""

    def predict(self, ctx: RouteContext, distance: int, k: int) -> dict[int, tuple[int, ...]]:
        """Top-k ids for each target layer ctx.layer+1 .. ctx.layer+distance the predictor has an opinion on."""
        out = {}
        for target in range(ctx.layer + 1, min(ctx.layer + distance, self.num_layers - 1) + 1):
            s = self.scores(ctx, target)
            if s is not None:
                out[target] = top_k_ids(s, k)
        return out


def _normalise(x: np.ndarray) -> np.ndarray | None:
    total = float(x.sum())
    return x / total if total > 0 else None


class AffinityPredictor(RoutePredictor):
    """P(expert at l+d | experts at l) from transition counts, smoothed toward layer l+d's popularity;
    every earlier routed layer of the token within `max_distance` of the target adds its evidence."""

    name = "affinity"

    def __init__(self, num_layers: int, num_experts: int, max_distance: int = 1, smoothing: float = 1.0) -> None:
        super().__init__(num_layers, num_experts)
        if max_distance <= 0 or smoothing < 0:
            raise ValueError(f"need max_distance > 0 and smoothing >= 0, got {max_distance}, {smoothing}")
        self.max_distance, self.smoothing = max_distance, smoothing
        self.counts = np.zeros((max_distance, num_layers, num_experts, num_experts))  # [D, L, E, E] l -> l+d+1
        self.popularity = np.zeros((num_layers, num_experts))  # [L, E]
        self._seen = np.zeros(num_layers)  # [L] popularity row sums
        self._current: dict[str, tuple[int, dict[int, tuple[int, ...]]]] = {}  # request -> (pos, route so far)

    def observe(self, request: str, pos: int, layer: int, experts: Sequence[int]) -> None:
        seen_pos, route = self._current.get(request, (None, {}))
        if seen_pos != pos:
            route = {}
            self._current[request] = (pos, route)
        ids = tuple(int(e) for e in experts)
        for src, src_ids in route.items():
            d = layer - src
            if 1 <= d <= self.max_distance:
                block = self.counts[d - 1, src]  # [E, E] view
                for a in src_ids:
                    for b in ids:
                        block[a, b] += 1
        for b in ids:
            self.popularity[layer, b] += 1
        self._seen[layer] += len(ids)
        route[layer] = ids

    def scores(self, ctx: RouteContext, target: int) -> np.ndarray | None:
        """Naive Bayes over every routed layer within max_distance of `target`: prior x prod(P(.|src)/prior)."""
        if target >= self.num_layers:
            return None
        prior = (self.popularity[target] + 1.0) / (self._seen[target] + self.num_experts)  # [E]
        out = None
        for src in range(max(target - self.max_distance, 0), min(ctx.layer, target - 1) + 1):
            ids = ctx.route.get(src)
            if not ids:
                continue
            rows = self.counts[target - src - 1, src][list(ids)]  # [K, E]
            given = ((rows + self.smoothing * prior) / (rows.sum(axis=1, keepdims=True) + self.smoothing)).mean(axis=0)
            out = given if out is None else _normalise(out * given / prior)
        return out

    def finish(self, request: str) -> None:
        self._current.pop(request, None)


class PreviousRoutePredictor(RoutePredictor):
    """The experts the previous token of the same request had at the target layer.

    Scores are calibrated online: an expert of the previous token's route gets the measured rate at
    which such experts recur at that layer, the others share the rest (scores x K = P(selected))."""

    name = "previous"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        self._last: dict[str, dict[int, tuple[int, tuple[int, ...]]]] = {}  # request -> layer -> (pos, experts)
        self._recur = np.zeros((num_layers, 2))  # [L, (experts that recurred, experts offered)]

    def observe(self, request: str, pos: int, layer: int, experts: Sequence[int]) -> None:
        ids = tuple(int(e) for e in experts)
        layers = self._last.setdefault(request, {})
        prev = layers.get(layer)
        if prev is not None and prev[0] == pos - 1:
            self._recur[layer] += (len(set(prev[1]) & set(ids)), len(prev[1]))
        layers[layer] = (pos, ids)

    def scores(self, ctx: RouteContext, target: int) -> np.ndarray | None:
        entry = self._last.get(ctx.request, {}).get(target)
        if entry is None or entry[0] >= ctx.pos:
            return None
        ids, e = entry[1], self.num_experts
        k = min(len(ids), e - 1)
        recurred, offered = self._recur[target]
        rate = (recurred + 1.0) / (offered + 2.0)  # P(a previous expert is selected again), Laplace rule
        out = np.full(e, max(k - k * rate, 0.0) / (e - k))
        out[list(ids[:k])] = rate
        return _normalise(out)

    def finish(self, request: str) -> None:
        self._last.pop(request, None)


class PregatePredictor(RoutePredictor):
    """Reads hidden-state-derived scores from the context (pre-gating; computed by the torch side)."""

    name = "pregate"

    def observe(self, request: str, pos: int, layer: int, experts: Sequence[int]) -> None:
        return None

    def scores(self, ctx: RouteContext, target: int) -> np.ndarray | None:
        if ctx.pregate is None or target not in ctx.pregate:
            return None
        raw = np.asarray(ctx.pregate[target], dtype=np.float64)
        if raw.shape != (self.num_experts,) or (raw < 0).any():
            raise ValueError(f"pregate scores for layer {target} must be {self.num_experts} values >= 0")
        return _normalise(raw)


class MixturePredictor(RoutePredictor):
    """Pools the components' scores over those with an opinion: "log" (default) prod_i s_i^w_i,
    "linear" sum_i w_i s_i (both renormalised)."""

    name = "mixture"

    def __init__(self, components: Sequence[RoutePredictor], weights: Sequence[float] | None = None,
                 pool: str = "log") -> None:
        weights = [1.0] * len(components) if weights is None else list(weights)
        if not components or len(components) != len(weights):
            raise ValueError(f"need one weight per component, got {len(components)} components, {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        if pool not in ("log", "linear"):
            raise ValueError(f"pool must be 'log' or 'linear', got {pool!r}")
        super().__init__(components[0].num_layers, components[0].num_experts)
        self.components, self.weights, self.pool = tuple(components), tuple(float(w) for w in weights), pool

    def observe(self, request: str, pos: int, layer: int, experts: Sequence[int]) -> None:
        for c in self.components:
            c.observe(request, pos, layer, experts)

    def scores(self, ctx: RouteContext, target: int) -> np.ndarray | None:
        return self.pool_scores([c.scores(ctx, target) if w > 0 else None
                                 for c, w in zip(self.components, self.weights)])

    def pool_scores(self, component_scores: Sequence[np.ndarray | None]) -> np.ndarray | None:
        """Pool scores already computed by each component (in component order)."""
        opinions = [(s, w) for s, w in zip(component_scores, self.weights) if s is not None and w > 0]
        if not opinions:
            return None
        if self.pool == "linear":
            return _normalise(sum(w * s for s, w in opinions))
        logs = sum(w * np.log(np.maximum(s, 1e-12)) for s, w in opinions)
        return _normalise(np.exp(logs - logs.max()))

    def finish(self, request: str) -> None:
        for c in self.components:
            c.finish(request)


class RecallMeter:
    """Top-k recall (|predicted ∩ actual| / |actual|) per lookahead distance and per target layer."""

    def __init__(self, max_distance: int, num_layers: int) -> None:
        if max_distance <= 0 or num_layers <= 0:
            raise ValueError(f"max_distance and num_layers must be > 0, got {max_distance}, {num_layers}")
        self.hits = np.zeros((max_distance, num_layers))  # [D, L] by distance - 1 and target layer
        self.total = np.zeros((max_distance, num_layers))

    def update(self, layer: int, target: int, predicted: Sequence[int], actual: Sequence[int]) -> None:
        d = target - layer
        if not 1 <= d <= self.hits.shape[0]:
            raise ValueError(f"lookahead {d} outside 1..{self.hits.shape[0]}")
        self.hits[d - 1, target] += len(set(predicted) & set(actual))
        self.total[d - 1, target] += len(actual)

    def recall(self, distance: int) -> float:
        total = self.total[distance - 1].sum()
        return float(self.hits[distance - 1].sum() / total) if total else 0.0

    def as_dict(self, prefix: str = "", per_layer: bool = False) -> dict[str, float]:
        """{prefix}recall_d{d} (and {prefix}recall_d{d}_layer{l} when per_layer): flat, for metrics."""
        out = {}
        for d in range(1, self.hits.shape[0] + 1):
            if self.total[d - 1].sum():
                out[f"{prefix}recall_d{d}"] = self.recall(d)
            for layer in np.nonzero(self.total[d - 1])[0] if per_layer else ():
                out[f"{prefix}recall_d{d}_layer{layer}"] = float(self.hits[d - 1, layer] / self.total[d - 1, layer])
        return out

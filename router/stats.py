"""Routing statistics (torch-free, numpy): popularity, co-activation, inter-layer transitions, repetition.

Everything is computed from a `RouteTable`: the trace's routes as one dense array, tokens grouped by
request (first-appearance order) with positions ascending. Counts are plain integers so that statistics
of two parts of a trace add up; probabilities are derived where asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from router.traces import RouteRecord, TraceShape, trace_shape, tokens

MISSING = -1  # expert slot of a layer a token has no record for (or a record with fewer than K experts)


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Routes of T tokens: `experts[t, l]` are token t's top-K expert ids at layer l."""

    requests: tuple[str, ...]  # request ids, first-appearance order
    request_index: np.ndarray  # [T] int64 index into `requests`
    pos: np.ndarray  # [T] int64 token position; ascending within a request
    experts: np.ndarray  # [T, L, K] int64, MISSING where absent
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def select(self, mask: np.ndarray) -> RouteTable:
        """The tokens where `mask` [T] is true, same requests tuple and shape."""
        return RouteTable(self.requests, self.request_index[mask], self.pos[mask], self.experts[mask], self.num_experts)


def route_table(records: Iterable[RouteRecord], shape: TraceShape | None = None) -> RouteTable:
    """Dense routes of every token in `records` (shape inferred from the records unless given)."""
    records = list(records)
    if not records:
        raise ValueError("no routing records")
    shape = shape or trace_shape(records)
    grouped = tokens(records)
    requests = tuple(dict.fromkeys(req for req, _, _ in grouped))
    index = {req: i for i, req in enumerate(requests)}
    grouped.sort(key=lambda item: (index[item[0]], item[1]))
    experts = np.full((len(grouped), shape.num_layers, shape.top_k), MISSING, dtype=np.int64)
    for t, (_, _, layers) in enumerate(grouped):
        for layer, ids in layers.items():
            if max(ids) >= shape.num_experts or layer >= shape.num_layers:
                raise ValueError(f"layer {layer} experts {ids} outside the trace shape {shape}")
            experts[t, layer, :len(ids)] = ids
    req_index = np.array([index[req] for req, _, _ in grouped], dtype=np.int64)
    pos = np.array([p for _, p, _ in grouped], dtype=np.int64)
    return RouteTable(requests, req_index, pos, experts, shape.num_experts)


def popularity(table: RouteTable) -> np.ndarray:
    """[L, E] token-expert assignments per layer and expert."""
    counts = np.zeros((table.num_layers, table.num_experts), dtype=np.int64)
    _, layer, _ = np.nonzero(table.experts != MISSING)
    np.add.at(counts, (layer, table.experts[table.experts != MISSING]), 1)
    return counts


def coactivation(table: RouteTable) -> np.ndarray:
    """[L, E, E] symmetric, zero diagonal: how often experts i and j serve the same token at one layer."""
    counts = np.zeros((table.num_layers, table.num_experts, table.num_experts), dtype=np.int64)
    layers = np.arange(table.num_layers)[None, :].repeat(table.num_tokens, axis=0)  # [T, L]
    for i in range(table.top_k):
        for j in range(table.top_k):
            a, b = table.experts[:, :, i], table.experts[:, :, j]
            ok = (a != MISSING) & (b != MISSING) & (i != j)
            np.add.at(counts, (layers[ok], a[ok], b[ok]), 1)
    return counts


def transitions(table: RouteTable, distance: int = 1) -> np.ndarray:
    """[max(L-d, 0), E, E]: counts of (expert a at layer l, expert b at layer l+d) on one token, all K x K pairs."""
    if distance < 1:
        raise ValueError(f"distance must be >= 1, got {distance}")
    depth = max(table.num_layers - distance, 0)
    counts = np.zeros((depth, table.num_experts, table.num_experts), dtype=np.int64)
    layers = np.arange(depth)[None, :].repeat(table.num_tokens, axis=0)  # [T, L-d]
    for i in range(table.top_k):
        for j in range(table.top_k):
            a, b = table.experts[:, :depth, i], table.experts[:, distance:, j]
            ok = (a != MISSING) & (b != MISSING)
            np.add.at(counts, (layers[ok], a[ok], b[ok]), 1)
    return counts


def top1_transitions(table: RouteTable, distance: int = 1) -> np.ndarray:
    """[L-d, E, E]: counts of (top-1 at layer l, top-1 at layer l+d) on the same token."""
    top1 = table.experts[:, :, :1]
    return transitions(RouteTable(table.requests, table.request_index, table.pos, top1, table.num_experts), distance)


def best_transition_accuracy(counts: np.ndarray) -> float:
    """In-sample accuracy of predicting, per (layer, source expert), the most frequent target."""
    total = counts.sum()
    return float(counts.max(axis=-1).sum() / total) if total else 0.0


def next_token_pairs(table: RouteTable) -> np.ndarray:
    """[P] indices t such that token t+1 is the next position of the same request."""
    same = table.request_index[1:] == table.request_index[:-1]
    step = table.pos[1:] == table.pos[:-1] + 1
    return np.nonzero(same & step)[0]


@dataclass(frozen=True, slots=True)
class Repetition:
    """Temporal repetition: how a token's route at a layer matches the previous token's there."""

    top1: float  # P(top-1 expert equals the previous token's top-1), over token pairs and layers
    overlap: float  # mean |experts ∩ previous experts| / K
    top1_per_layer: np.ndarray  # [L]
    pairs: int  # (token pair, layer) cases counted


def repetition(table: RouteTable) -> Repetition:
    t = next_token_pairs(table)
    prev, cur = table.experts[t], table.experts[t + 1]  # [P, L, K]
    valid = (prev[:, :, 0] != MISSING) & (cur[:, :, 0] != MISSING)  # [P, L]
    same_top1 = (prev[:, :, 0] == cur[:, :, 0]) & valid
    shared = ((cur[:, :, :, None] == prev[:, :, None, :]) & (cur[:, :, :, None] != MISSING)).any(-1).sum(-1)  # [P, L]
    cases = int(valid.sum())
    per_layer = same_top1.sum(0) / np.maximum(valid.sum(0), 1)
    if not cases:
        return Repetition(0.0, 0.0, per_layer, 0)
    return Repetition(float(same_top1.sum() / cases), float(shared[valid].sum() / (cases * table.top_k)),
                      per_layer, cases)


def summary(table: RouteTable) -> dict[str, float]:
    """A flat dict of headline statistics (for logs, metrics and the replay report)."""
    pop = popularity(table)
    mean = np.maximum(pop.mean(axis=1), 1e-12)
    rep = repetition(table)
    out = {"tokens": float(table.num_tokens), "layers": float(table.num_layers),
           "experts": float(table.num_experts), "top_k": float(table.top_k),
           "popularity_max_over_mean": float((pop.max(axis=1) / mean).mean()),
           "repetition_top1": rep.top1, "repetition_overlap": rep.overlap,
           "uniform_top1": 1.0 / table.num_experts}
    if table.num_layers > 1:
        out["transition_top1_best_accuracy"] = best_transition_accuracy(top1_transitions(table))
    return out


def markov_routes(requests: int, tokens_per_request: int, layers: int, experts: int, top_k: int,
                  affinity: float, repeat: float, seed: int = 0) -> list[RouteRecord]:
    """Synthetic routes from a stated generative process (tests, and checks beyond one recorded trace).

    Layer l has a fixed random permutation pi_l of the experts. Slot j of a token's route at layer 0 is
    the previous token's slot j (same request) with probability `repeat`, else uniform; at layer l+1 it
    is pi_l(slot j at l) with probability `affinity`, else (with probability `repeat`) the previous
    token's slot j at l+1, else uniform. A duplicate within a route is redrawn uniformly. Gate weights
    are equal. `affinity` = 1 gives deterministic chains; 0 and 0 give uniform routing."""
    import random

    if not (0 <= affinity <= 1 and 0 <= repeat <= 1) or not 0 < top_k <= experts:
        raise ValueError(f"need 0 <= affinity, repeat <= 1 and 0 < top_k <= experts, got "
                         f"{affinity}, {repeat}, {top_k}, {experts}")
    rng = random.Random(seed)
    perms = [rng.sample(range(experts), experts) for _ in range(layers)]
    out = []
    for r in range(requests):
        prev: list[list[int]] | None = None
        for pos in range(tokens_per_request):
            route: list[list[int]] = []
            for layer in range(layers):
                ids: list[int] = []
                for j in range(top_k):
                    u = rng.random()
                    if layer > 0 and u < affinity:
                        e = perms[layer - 1][route[-1][j]]
                    elif prev is not None and rng.random() < repeat:
                        e = prev[layer][j]
                    else:
                        e = rng.randrange(experts)
                    while e in ids:
                        e = rng.randrange(experts)
                    ids.append(e)
                route.append(ids)
                out.append(RouteRecord(f"synthetic/{r}", pos, layer, tuple(ids), (1.0 / top_k,) * top_k))
            prev = route
    return out

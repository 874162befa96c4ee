"""Redundant experts (torch- and ray-free): copies of experts on shards beside the attention workers
whose sequences use them, so that request shuffling (router/shuffle.py) keeps more of a sequence's
tokens on its node. DeepSeek-V3's inference keeps redundant copies of hot experts for load balance;
here a node copies the remote experts its own sequences use most, as far as the shards' load stays
balanced. A copy costs one expert's memory on its shard.

Vocabulary: attention worker a routes its tokens by its own table; `local_shard[a]` is the shard on
its node (None if none); `owner[layer][e]` is the shard that owns expert e.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Replicas = list[dict[int, tuple[int, ...]]]  # per shard: MoE layer -> experts it holds besides its own


def worker_tables(owner: Mapping[int, Sequence[int]], replicas: Replicas,
                  local_shard: Sequence[int | None]) -> list[dict[int, tuple[int, ...]]]:
    """Per attention worker: MoE layer -> the shard its tokens of each expert go to: the shard on its
    own node (local_shard[a], None if there is none) where that shard holds the expert as a replica,
    else the expert's owner."""
    tables = []
    for local in local_shard:
        extra = replicas[local] if local is not None else {}
        tables.append({layer: tuple(local if e in extra.get(layer, ()) else int(s) for e, s in enumerate(row))
                       for layer, row in owner.items()})
    return tables


def shard_loads(owner: Mapping[int, Sequence[int]], replicas: Replicas, local_shard: Sequence[int | None],
                worker_counts: Sequence[Mapping[int, Sequence[float]]], num_shards: int) -> dict[int, np.ndarray]:
    """MoE layer -> [S] token-expert assignments each shard serves, routed by the per-worker tables."""
    tables = worker_tables(owner, replicas, local_shard)
    out = {}
    for layer, row in owner.items():
        load = np.zeros(num_shards)
        for table, counts in zip(tables, worker_counts):
            np.add.at(load, np.asarray(table[layer], dtype=np.int64),
                      np.asarray(counts.get(layer, [0.0] * len(row)), dtype=float))
        out[layer] = load
    return out


def plan_replicas(owner: Mapping[int, Sequence[int]], num_shards: int, local_shard: Sequence[int | None],
                  worker_counts: Sequence[Mapping[int, Sequence[float]]], per_layer: int,
                  max_load_ratio: float = 1.25) -> Replicas:
    """Replicas for request shuffling: up to `per_layer` copies per layer on each shard with attention
    workers on its node, of the experts it does not own that those workers' tokens used most
    (worker_counts[a][layer][e]), as far as the shards' expected loads (tokens routed to each by the
    per-worker tables) stay within both max_load_ratio x their mean and the largest load without
    copies. Per layer: each shard first takes its `per_layer` most used; while a load is over the
    limit, the copy serving the fewest tokens on the busiest shard goes; then, while one fits, the
    copy serving the most tokens among those left is added. A copy only moves tokens from the
    expert's owner to the copy's shard: the mean never changes, and copies on two shards can
    balance each other where neither fits alone."""
    if per_layer < 0:
        raise ValueError(f"per_layer must be >= 0, got {per_layer}")
    replicas: Replicas = [{} for _ in range(num_shards)]
    for layer, row in owner.items():
        counts = [list(w.get(layer, [0.0] * len(row))) for w in worker_counts]
        load = _layer_load(owner, [{} for _ in range(num_shards)], local_shard, layer, counts, num_shards)
        for s, copies in enumerate(_layer_copies(row, _served(row, counts, local_shard), load, per_layer,
                                                 max(max_load_ratio * load.mean(), load.max()) + 1e-9)):
            if copies:
                replicas[s][layer] = tuple(sorted(e for _, e in copies))
    return replicas


def _layer_copies(row: Sequence[int], served: dict[tuple[int, int], float], load: np.ndarray, per_layer: int,
                  limit: float) -> list[list[tuple[float, int]]]:
    """Per shard, its copies at one layer as (tokens served, expert): the `per_layer` most used, less
    the smallest on the busiest shard while a load is over `limit`, then the largest that fit."""
    ranked = sorted(served.items(), key=lambda kv: (-kv[1], kv[0]))
    held = [[(n, e) for (s2, e), n in ranked if s2 == s][:per_layer] for s in range(len(load))]
    load = load.copy()
    for s, copies in enumerate(held):
        for n, e in copies:
            _shift(load, row, s, e, n)
    while load.max() > limit:  # the busiest shard holds a copy: without copies no load is over
        busiest = int(np.argmax(load))
        n, e = min(held[busiest])
        held[busiest].remove((n, e))
        _shift(load, row, busiest, e, -n)
    while True:
        fits = next(((s, e, n) for (s, e), n in ranked if len(held[s]) < per_layer and (n, e) not in held[s]
                     and load[s] + n <= limit), None)
        if fits is None:
            return held
        s, e, n = fits
        held[s].append((n, e))
        _shift(load, row, s, e, n)


def _shift(load: np.ndarray, row: Sequence[int], shard: int, expert: int, tokens: float) -> None:
    """A copy of `expert` on `shard` taking `tokens` off its owner row[expert] (negative: dropping it)."""
    load[shard] += tokens
    load[row[expert]] -= tokens


def _served(row: Sequence[int], counts: list[list[float]],
            local_shard: Sequence[int | None]) -> dict[tuple[int, int], float]:
    """(shard, expert) -> tokens a copy there would serve: those of the workers on the shard's node
    that used the expert, which the shard does not own."""
    served: dict[tuple[int, int], float] = {}
    for a, c in enumerate(counts):
        s = local_shard[a]
        if s is None:
            continue
        for e in range(len(row)):
            if row[e] != s and c[e] > 0:
                served[(s, e)] = served.get((s, e), 0.0) + c[e]
    return served


def _layer_load(owner, replicas: Replicas, local_shard, layer: int, counts, num_shards: int) -> np.ndarray:
    return shard_loads({layer: owner[layer]}, replicas, local_shard, [{layer: c} for c in counts], num_shards)[layer]

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
    """Replicas for request shuffling: for each attention worker with a shard on its node, the
    `per_layer` experts its tokens used most (worker_counts[a][layer][e]) that the shard does not
    own, copied there so those tokens stay on the node. Per layer, while the expected shard loads
    (tokens routed to each shard by the per-worker tables) exceed both max_load_ratio x their mean
    and the largest load without copies, the copy serving the fewest tokens on the busiest shard
    is refused and its worker's next most used expert tried instead."""
    if per_layer < 0:
        raise ValueError(f"per_layer must be >= 0, got {per_layer}")
    replicas: Replicas = [{} for _ in range(num_shards)]
    for layer, row in owner.items():
        counts = [list(w.get(layer, [0.0] * len(row))) for w in worker_counts]
        base = _layer_load(owner, replicas, local_shard, layer, counts, num_shards).max()
        refused: set[tuple[int, int]] = set()
        while True:
            served = _wanted(row, counts, local_shard, per_layer, refused)
            for s in range(num_shards):
                replicas[s][layer] = tuple(sorted(e for (t, e) in served if t == s))
            load = _layer_load(owner, replicas, local_shard, layer, counts, num_shards)
            if not served or load.max() <= max(max_load_ratio * load.mean(), base) + 1e-9:
                break
            busiest = int(np.argmax(load))  # it holds a copy: without copies no load exceeds `base`
            refused.add(min((n, key) for key, n in served.items() if key[0] == busiest)[1])
    return [{layer: ids for layer, ids in r.items() if ids} for r in replicas]


def _wanted(row: Sequence[int], counts: list[list[float]], local_shard: Sequence[int | None], per_layer: int,
            refused: set[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """(shard, expert) -> tokens served: each worker's `per_layer` most used remote experts not refused."""
    served: dict[tuple[int, int], float] = {}
    for a, c in enumerate(counts):
        s = local_shard[a]
        if s is None:
            continue
        remote = [e for e in range(len(row)) if row[e] != s and c[e] > 0 and (s, e) not in refused]
        for e in sorted(remote, key=lambda e: -c[e])[:per_layer]:
            served[(s, e)] = served.get((s, e), 0.0) + c[e]
    return served


def _layer_load(owner, replicas: Replicas, local_shard, layer: int, counts, num_shards: int) -> np.ndarray:
    return shard_loads({layer: owner[layer]}, replicas, local_shard, [{layer: c} for c in counts], num_shards)[layer]

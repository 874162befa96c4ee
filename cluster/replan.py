"""Re-planning expert placement from live routing statistics (torch- and ray-free).

The live placement is `owner[layer][e]` = the shard holding expert e. Statistics are keyed by MoE
layer; they are laid out over the MoE layers in order (index i = the i-th MoE layer), so that
"the next layer" in the transitions is the next MoE layer. Each shard keeps at most as many
experts per layer as the fullest shard has now, so no shard's memory grows.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from router.grouping import GroupingConfig, Placement, group_experts, moves


def current_placement(owner: Mapping[int, Sequence[int]], moe_layers: Sequence[int], num_shards: int) -> Placement:
    return Placement(np.array([list(owner[layer]) for layer in moe_layers], dtype=np.int64), num_shards)


def stats_arrays(moe_layers: Sequence[int], num_experts: int, popularity: Mapping[int, Sequence[float]],
                 coactivation: Mapping[int, np.ndarray], transitions: Mapping[int, np.ndarray]):
    """-> (popularity [L, E], coactivation [L, E, E], transitions [L-1, E, E]) over the MoE layers."""
    n = len(moe_layers)
    pop = np.array([list(popularity.get(layer, [0] * num_experts)) for layer in moe_layers], dtype=float)
    co = np.stack([np.asarray(coactivation.get(layer, np.zeros((num_experts, num_experts)))) for layer in moe_layers])
    tr = np.stack([np.asarray(transitions.get(layer, np.zeros((num_experts, num_experts))))
                   for layer in moe_layers[:-1]]) if n > 1 else np.zeros((0, num_experts, num_experts))
    return pop, co, tr


def replan(owner: Mapping[int, Sequence[int]], moe_layers: Sequence[int], num_shards: int,
           popularity: Mapping[int, Sequence[float]], coactivation: Mapping[int, np.ndarray],
           transitions: Mapping[int, np.ndarray], max_load_ratio: float = 1.25) -> dict[int, tuple[int, ...]]:
    """A new owner table (layer -> shard of each expert) that co-locates experts tokens use together,
    seeded from the current one (few moves), balanced to max/mean expected load <= max_load_ratio."""
    current = current_placement(owner, moe_layers, num_shards)
    num_experts = current.node_of.shape[1]
    capacity = int(max(np.bincount(row, minlength=num_shards).max() for row in current.node_of))
    pop, co, tr = stats_arrays(moe_layers, num_experts, popularity, coactivation, transitions)
    if pop.sum() == 0:
        return {layer: tuple(owner[layer]) for layer in moe_layers}
    new = group_experts(pop + 1e-3, co, tr, GroupingConfig(num_shards, max_load_ratio, capacity), start=current)
    return {layer: tuple(int(s) for s in new.node_of[i]) for i, layer in enumerate(moe_layers)}


def shard_assignment(owner: Mapping[int, Sequence[int]], num_shards: int) -> list[dict[int, tuple[int, ...]]]:
    """Owner table -> per shard, layer -> the expert ids it holds."""
    out: list[dict[int, tuple[int, ...]]] = [{} for _ in range(num_shards)]
    for layer, row in owner.items():
        for s in range(num_shards):
            out[s][layer] = tuple(e for e, o in enumerate(row) if o == s)
    return out


def count_moves(old: Mapping[int, Sequence[int]], new: Mapping[int, Sequence[int]], moe_layers: Sequence[int],
                num_shards: int) -> int:
    return len(moves(current_placement(old, moe_layers, num_shards), current_placement(new, moe_layers, num_shards)))


# ---- redundant experts (replicas) beside request shuffling ------------------------------------
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
    own, copied there so those tokens stay on the node. A replica is kept only while the layer's
    expected shard loads (tokens routed to each shard by the per-worker tables) stay within
    max_load_ratio x their mean, or do not get worse than without it."""
    if per_layer < 0:
        raise ValueError(f"per_layer must be >= 0, got {per_layer}")
    replicas: Replicas = [{} for _ in range(num_shards)]
    zeros = {layer: [0.0] * len(row) for layer, row in owner.items()}
    for layer, row in owner.items():
        counts = [list(w.get(layer, zeros[layer])) for w in worker_counts]
        if sum(map(sum, counts)) == 0:
            continue
        candidates = sorted(((c[e], a, e) for a, c in enumerate(counts) if local_shard[a] is not None
                             for e in range(len(row)) if row[e] != local_shard[a] and c[e] > 0), reverse=True)
        taken = [0] * len(local_shard)
        for _, a, e in candidates:
            s = local_shard[a]
            if taken[a] >= per_layer or e in replicas[s].get(layer, ()):
                continue
            before = _layer_load(owner, replicas, local_shard, layer, counts, num_shards)
            replicas[s][layer] = replicas[s].get(layer, ()) + (e,)
            after = _layer_load(owner, replicas, local_shard, layer, counts, num_shards)
            if after.max() > max(max_load_ratio * after.mean(), before.max()) + 1e-9:
                replicas[s][layer] = replicas[s][layer][:-1]
                continue
            taken[a] += 1
    return [{layer: tuple(sorted(ids)) for layer, ids in r.items() if ids} for r in replicas]


def _layer_load(owner, replicas: Replicas, local_shard, layer: int, counts, num_shards: int) -> np.ndarray:
    return shard_loads({layer: owner[layer]}, replicas, local_shard, [{layer: c} for c in counts], num_shards)[layer]

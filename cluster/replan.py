"""Re-planning expert placement from live routing statistics (torch- and ray-free).

The live placement is `owner[layer][e]` = the shard holding expert e. Statistics are keyed by MoE
layer; they are laid out over the MoE layers in order (index i = the i-th MoE layer), so that
"the next layer" in the transitions is the next MoE layer. Each shard keeps at most as many
experts per layer as the fullest shard has now, so no shard's memory grows.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from router.grouping import GroupingConfig, Placement, align, group_experts, moves


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
    balanced to max/mean expected load <= max_load_ratio; the current one is among the searches'
    starts, and the shards are named to keep as many experts where they are as the grouping allows."""
    current = current_placement(owner, moe_layers, num_shards)
    num_experts = current.node_of.shape[1]
    capacity = int(max(np.bincount(row, minlength=num_shards).max() for row in current.node_of))
    pop, co, tr = stats_arrays(moe_layers, num_experts, popularity, coactivation, transitions)
    if pop.sum() == 0:
        return {layer: tuple(owner[layer]) for layer in moe_layers}
    new = align(group_experts(pop + 1e-3, co, tr, GroupingConfig(num_shards, max_load_ratio, capacity), start=current),
                current)
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

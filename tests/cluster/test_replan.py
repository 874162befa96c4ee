"""Re-planning expert placement from live statistics (no Ray): co-activated experts end up together."""

from __future__ import annotations

import numpy as np

from cluster.replan import count_moves, replan, shard_assignment


def test_pairs_that_fire_together_are_co_located_within_capacity():
    layers, experts = (0, 1), 8
    owner = {layer: (0, 1, 0, 1, 0, 1, 0, 1) for layer in layers}  # pairs (0,1), (2,3)... split apart
    co = np.zeros((experts, experts))
    for a in range(0, experts, 2):
        co[a, a + 1] = co[a + 1, a] = 100.0
    pop = {layer: [10] * experts for layer in layers}
    new = replan(owner, layers, 2, pop, {layer: co for layer in layers}, {0: np.zeros((experts, experts))})
    for layer in layers:
        row = new[layer]
        assert all(row[a] == row[a + 1] for a in range(0, experts, 2))  # every pair on one shard
        assert sorted(np.bincount(row, minlength=2)) == [4, 4]  # capacity: no shard grows
    assert count_moves(owner, new, layers, 2) > 0
    held = shard_assignment(new, 2)
    assert sorted(held[0][0] + held[1][0]) == list(range(experts))


def test_without_statistics_nothing_moves():
    owner = {0: (0, 1, 0, 1)}
    assert replan(owner, [0], 2, {}, {}, {}) == owner

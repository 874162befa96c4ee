"""Re-planning expert placement from live statistics (no Ray): co-activated experts end up together."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.mark.parametrize("flip", [0, 1])
def test_a_better_grouping_found_elsewhere_keeps_as_many_experts_in_place_as_it_can(flip):
    # Pairs (0, 1) and (2, 3) at three layers, each expert followed by itself. Layer 0 is crossed
    # against layers 1 and 2, and no single swap helps; the grouping found from other starts has
    # every layer alike, under either shard naming: moving layer 0 (4 experts) beats moving 1 and 2.
    layers, experts = (0, 1, 2), 4
    owner = {0: (0, 0, 1, 1), 1: (1, 1, 0, 0), 2: (1, 1, 0, 0)}
    owner = {layer: tuple(s ^ flip for s in row) for layer, row in owner.items()}
    co = np.zeros((experts, experts))
    co[0, 1] = co[1, 0] = co[2, 3] = co[3, 2] = 10.0
    new = replan(owner, layers, 2, {layer: [1.0] * experts for layer in layers}, {layer: co for layer in layers},
                 {layer: 4.0 * np.eye(experts) for layer in layers[:-1]})
    assert new == {layer: owner[2] for layer in layers}
    assert count_moves(owner, new, layers, 2) == 4

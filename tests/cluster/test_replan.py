"""Re-planning expert placement from live statistics (no Ray): co-activated experts end up together."""

from __future__ import annotations

import numpy as np

from cluster.replan import count_moves, plan_replicas, replan, shard_assignment, worker_tables


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


# ---- replicas ----------------------------------------------------------------------------------
OWNER = {0: (0, 0, 1, 1)}  # layer 0: experts 0, 1 on shard 0; 2, 3 on shard 1


def test_workers_use_the_replica_on_their_node_and_the_owner_elsewhere():
    replicas = [{0: (2,)}, {}]  # shard 0 also holds expert 2
    tables = worker_tables(OWNER, replicas, [0, 1, None])  # worker 2 has no shard on its node
    assert tables == [{0: (0, 0, 0, 1)}, {0: (0, 0, 1, 1)}, {0: (0, 0, 1, 1)}]


def test_each_worker_gets_copies_of_the_remote_experts_its_tokens_use_most():
    counts = [{0: [5, 5, 9, 1]}, {0: [1, 7, 5, 5]}]  # worker 0 (beside shard 0) uses expert 2 most of the remote ones
    assert plan_replicas(OWNER, 2, [0, 1], counts, per_layer=1, max_load_ratio=2.0) == [{0: (2,)}, {0: (1,)}]
    assert plan_replicas(OWNER, 2, [0, 1], counts, per_layer=0) == [{}, {}]
    assert plan_replicas(OWNER, 2, [None, 1], counts, per_layer=1, max_load_ratio=2.0) == [{}, {0: (1,)}]


def test_a_replica_that_would_unbalance_the_shards_is_left_out():
    # without replicas shard 0 gets worker 0's 10 + 10 tokens and shard 1 worker 0's 10 and worker 1's
    # 5 (max/mean 20 / 17.5). Copying expert 2 to shard 0 would give it 30 against 5 (max/mean 1.71):
    # the 1.25 limit refuses it, a 2.0 limit takes it.
    counts = [{0: [10, 10, 10, 0]}, {0: [0, 0, 0, 5]}]
    assert plan_replicas(OWNER, 2, [0, 1], counts, per_layer=1, max_load_ratio=1.25) == [{}, {}]
    assert plan_replicas(OWNER, 2, [0, 1], counts, per_layer=1, max_load_ratio=2.0) == [{0: (2,)}, {}]

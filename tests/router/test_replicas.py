"""Redundant experts: which copies each node gets, and where each worker's tokens then go."""

from __future__ import annotations

from router.replicas import plan_replicas, worker_tables

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
    # worker 0's next most used remote expert (3, one token) replaces the refused copy of expert 2:
    # shard 0 then gets 21 tokens against shard 1's 15 (max/mean 1.17)
    counts = [{0: [10, 10, 10, 1]}, {0: [0, 0, 0, 5]}]
    assert plan_replicas(OWNER, 2, [0, 1], counts, per_layer=1, max_load_ratio=1.25) == [{0: (3,)}, {}]


def test_the_copy_serving_most_tokens_that_fits_is_taken_once_another_shards_copy_makes_room():
    # without copies shard 0 serves worker 0's 17 tokens and worker 1's 3 (20, the busiest: the limit).
    # Copying expert 2 (6 tokens) or 3 (3 tokens) to shard 0 would pass 20; copying expert 0 to
    # shard 1 takes worker 1's 3 tokens off shard 0, and then expert 3 fits (expert 2 still does not).
    counts = [{0: [10, 7, 6, 3]}, {0: [3, 0, 0, 0]}]
    for per_layer in (1, 2):  # asking for 2 used to give fewer copies than 1: [{}, {0: (0,)}]
        assert plan_replicas(OWNER, 2, [0, 1], counts, per_layer, max_load_ratio=1.25) == [{0: (3,)}, {0: (0,)}]


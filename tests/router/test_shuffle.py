"""Request shuffling policy: moves toward the predicted shards only when the saving pays for the KV copy."""

from __future__ import annotations

import numpy as np
import pytest

from router.shuffle import Homes, Move, RequestShuffler, ShuffleConfig, ShuffleGeometry

# worker 0 and shard 0 on node a, worker 1 and shard 1 on node b; 100-byte vectors, 10-byte KV per token
GEOMETRY = ShuffleGeometry(("a", "b"), ("a", "b"), vector_bytes=100, kv_bytes_per_token=10)


def _shuffler(**config) -> RequestShuffler:
    return RequestShuffler(ShuffleConfig(**config))


def test_a_sequence_moves_to_the_node_of_the_shard_its_tokens_reach():
    s = _shuffler(payback_tokens=8)
    s.observe(7, np.array([[0, 4]] * 3))  # 3 tokens, each reaching shard 1 at 4 layers
    # on worker 0 each token sends 4 vectors out and gets 4 back: 800 bytes; on worker 1 none
    assert s.remote_bytes(7, GEOMETRY).tolist() == [800.0, 0.0]
    assert s.plan({7: (0, 20)}, [1, 0], GEOMETRY) == {7: 1}  # saves 8 x 800 bytes, copies 20 x 10
    assert s.plan({7: (1, 20)}, [0, 1], GEOMETRY) == {}  # already there


def test_a_move_that_costs_more_kv_than_it_saves_is_not_made():
    s = _shuffler(payback_tokens=8)
    s.observe(7, np.array([[3, 4]]))  # shard 1 reached at one more layer than shard 0
    assert s.remote_bytes(7, GEOMETRY).tolist() == [800.0, 600.0]
    assert s.plan({7: (0, 159)}, [1, 0], GEOMETRY) == {7: 1}  # 8 x 200 saved > 159 x 10 copied
    assert s.plan({7: (0, 160)}, [1, 0], GEOMETRY) == {}  # 1,600 saved = 1,600 copied: stays


def test_workers_on_one_node_move_for_free_and_unseen_sequences_stay():
    shared = ShuffleGeometry(("a", "a"), ("a", "b"), vector_bytes=100, kv_bytes_per_token=10)
    assert shared.move_bytes(0, 1, 1000) == 0 and GEOMETRY.move_bytes(0, 1, 1000) == 10_000
    s = _shuffler()
    assert s.plan({3: (0, 5)}, [1, 0], GEOMETRY) == {}  # nothing observed: no prediction, no move


def test_the_load_cap_lets_the_best_saving_move_first():
    s = _shuffler(payback_tokens=8, max_load_ratio=1.0)
    s.observe(1, np.array([[0, 1]]))  # saves 200 bytes a token on worker 1
    s.observe(2, np.array([[0, 4]]))  # saves 800
    s.observe(3, np.array([[1, 0]]))  # happy on worker 0
    # 4 sequences on 2 workers: at most 2 each; worker 1 has 1, so one of the two may move
    assert s.plan({1: (0, 1), 2: (0, 1), 3: (0, 1)}, [3, 1], GEOMETRY) == {2: 1}


def test_the_average_follows_a_sequence_whose_routes_change():
    s = _shuffler(decay=0.5)
    s.observe(1, np.array([[4, 0]]))
    s.observe(1, np.array([[0, 4], [0, 4]]))  # two tokens: the old average keeps 0.25 of its weight
    assert s.remote_bytes(1, GEOMETRY).tolist() == pytest.approx([2 * 100 * 3.0, 2 * 100 * 1.0])
    s.forget(1)
    assert s.remote_bytes(1, GEOMETRY) is None


def test_min_tokens_holds_a_new_sequence_back():
    s = _shuffler(payback_tokens=8, min_tokens=2)
    s.observe(1, np.array([[0, 4]]))
    assert s.plan({1: (0, 1)}, [1, 0], GEOMETRY) == {}
    s.observe(1, np.array([[0, 4]]))
    assert s.plan({1: (0, 1)}, [1, 0], GEOMETRY) == {1: 1}


@pytest.mark.parametrize("bad", [{"decay": 1.0}, {"decay": -0.1}, {"payback_tokens": 0}, {"min_tokens": 0},
                                 {"max_load_ratio": 0.9}])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        ShuffleConfig(**bad)


class ToWorker1:
    """Moves every running sequence to worker 1."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}
        self.load = None

    def observe(self, seq_id, hits) -> None:
        self.seen[seq_id] = self.seen.get(seq_id, 0) + len(hits)

    def forget(self, seq_id) -> None:
        self.seen.pop(seq_id, None)

    def plan(self, running, load, geometry):
        self.load = load
        return {sid: 1 for sid, (here, _) in running.items() if here != 1}


def test_homes_start_sequences_on_seq_id_mod_workers_and_apply_the_planned_moves():
    policy = ToWorker1()
    homes = Homes(2, GEOMETRY, policy)
    assert [homes.arrive(s, fresh=True) for s in (4, 5, 6)] == [0, 1, 0]
    moves = homes.shuffle({4: 20, 6: 3})  # 5 is running but has no token this step: it stays
    assert policy.load == [2, 1]  # every placed sequence counts
    assert moves == [Move(4, 0, 1, 200), Move(6, 0, 1, 30)] and homes.kv_at == {4: 1, 5: 1, 6: 1}
    assert homes.arrive(4, fresh=False) == 1  # a running sequence stays where it moved
    assert homes.arrive(4, fresh=True) == 0  # a fresh start (nothing cached) goes home
    homes.observe(5, np.zeros((3, 2)))
    assert policy.seen == {5: 3}
    homes.release(5)
    assert policy.seen == {} and 5 not in homes.kv_at
    assert Homes(2).shuffle({4: 20}) == []  # no shuffler: nothing moves

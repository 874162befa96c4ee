"""Sequence homes (no Ray): new sequences start on seq_id mod A, moves come with their KV slots and bytes."""

from __future__ import annotations

import numpy as np

from cluster.scheduler import ScheduledChunk
from cluster.sequence_homes import SequenceHomes
from router.shuffle import ShuffleGeometry

GEOMETRY = ShuffleGeometry(("a", "b"), ("a", "b"), vector_bytes=100, kv_bytes_per_token=10)


class ToWorker1:
    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def observe(self, seq_id, hits) -> None:
        self.seen[seq_id] = self.seen.get(seq_id, 0) + len(hits)

    def forget(self, seq_id) -> None:
        self.seen.pop(seq_id, None)

    def plan(self, running, load, geometry):
        return {sid: 1 for sid, (here, _) in running.items() if here != 1}


def _chunk(seq_id: int, start: int, n: int) -> ScheduledChunk:
    return ScheduledChunk(seq_id, tuple(range(n)), start, block_ids=(3, 7), sample=True)


def test_new_sequences_start_on_seq_id_mod_workers_and_stay_without_a_shuffler():
    homes = SequenceHomes(2, block_size=4)
    assert homes.place((_chunk(4, 0, 5), _chunk(5, 0, 2))) == []
    assert homes.kv_at == {4: 0, 5: 1}
    assert homes.place((_chunk(4, 5, 1),)) == [] and homes.kv_at[4] == 0
    per_worker = homes.split((_chunk(4, 5, 1), _chunk(5, 2, 1)), parts=lambda chunks: 1)
    assert [[[c.seq_id for c in mb] for mb in w] for w in per_worker] == [[[4]], [[5]]]
    homes.release(4)
    assert homes.kv_at == {5: 1}


def test_a_moving_sequence_brings_the_slots_of_its_cached_positions():
    policy = ToWorker1()
    homes = SequenceHomes(2, block_size=4, geometry=GEOMETRY, shuffler=policy)
    homes.place((_chunk(4, 0, 6),))  # prefill: nothing cached, nothing to move
    (move,) = homes.place((_chunk(4, 6, 1),))
    assert (move.seq_id, move.src, move.dst) == (4, 0, 1)
    assert move.slots.tolist() == [12, 13, 14, 15, 28, 29]  # blocks 3 and 7 of 4 slots, 6 positions
    assert move.cross_node_bytes == 6 * 10
    assert homes.kv_at[4] == 1 and homes.place((_chunk(4, 7, 1),)) == []
    placed = [[[_chunk(4, 7, 1)]]]
    homes.observe_step(placed, [[np.zeros((1, 2))]])
    assert policy.seen == {4: 1}
    homes.release(4)
    assert policy.seen == {} and homes.kv_at == {}

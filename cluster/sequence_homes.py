"""Which attention worker holds each sequence's KV cache, and how a step is split among the workers
(torch- and ray-free bookkeeping for cluster/ray_model.py).

A new sequence (its first chunk starts at 0: nothing cached) goes to worker seq_id mod A. With a
shuffler (router/shuffle.py: anything with observe / plan / forget), a running sequence may move
between two steps: `place` returns the KV copies to make first, with their cross-node bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.block_manager import context_slots
from cluster.scheduler import ScheduledChunk
from router.shuffle import ShuffleGeometry


@dataclass(frozen=True, slots=True)
class KVMove:
    seq_id: int
    src: int  # attention worker holding the KV now
    dst: int
    slots: np.ndarray  # [start] int64 KV slots of the positions computed so far
    cross_node_bytes: int


class SequenceHomes:
    def __init__(self, num_workers: int, block_size: int, geometry: ShuffleGeometry | None = None,
                 shuffler=None) -> None:
        self.num_workers, self.block_size = num_workers, block_size
        self.geometry = geometry  # where the actors sit (needed with a shuffler)
        self.shuffler = shuffler
        self.kv_at: dict[int, int] = {}  # seq_id -> the worker holding its KV cache

    def place(self, chunks: tuple[ScheduledChunk, ...]) -> list[KVMove]:
        """Assign every chunk's sequence a worker for this step; -> the KV copies to make before it."""
        for c in chunks:
            if c.start == 0 or c.seq_id not in self.kv_at:
                self.kv_at[c.seq_id] = c.seq_id % self.num_workers
        if self.shuffler is None:
            return []
        running = {c.seq_id: (self.kv_at[c.seq_id], c.start) for c in chunks if c.start > 0}
        load = np.bincount(list(self.kv_at.values()), minlength=self.num_workers).tolist()
        by_seq = {c.seq_id: c for c in chunks}
        moves = []
        for sid, dst in self.shuffler.plan(running, load).items():
            src, c = self.kv_at[sid], by_seq[sid]
            moves.append(KVMove(sid, src, dst, context_slots(c.block_ids, c.start, self.block_size),
                                self.geometry.move_bytes(src, dst, c.start)))
            self.kv_at[sid] = dst
        return moves

    def split(self, chunks: tuple[ScheduledChunk, ...], parts) -> list[list[list[ScheduledChunk]]]:
        """Chunks -> per worker -> micro-batches balanced by token count; `parts(chunks)` -> 1 or 2."""
        groups: list[list[ScheduledChunk]] = [[] for _ in range(self.num_workers)]
        for c in chunks:
            groups[self.kv_at[c.seq_id]].append(c)
        return [balance(g, parts(g)) for g in groups]

    def observe(self, placed: list[list[list[ScheduledChunk]]], hits: list[list[np.ndarray]]) -> None:
        """hits[call][micro-batch]: [T, S] MoE layers at which each token reached each shard."""
        if self.shuffler is None:
            return
        for microbatches, per_mb in zip(placed, hits):
            for mb, h in zip(microbatches, per_mb):
                row = 0
                for c in mb:
                    self.shuffler.observe(c.seq_id, h[row:row + len(c.token_ids)])
                    row += len(c.token_ids)

    def release(self, seq_id: int) -> None:
        self.kv_at.pop(seq_id, None)
        if self.shuffler is not None:
            self.shuffler.forget(seq_id)


def balance(chunks: list[ScheduledChunk], parts: int) -> list[list[ScheduledChunk]]:
    """Split into up to `parts` groups of consecutive chunks with about equal token counts."""
    if len(chunks) < 2 or parts == 1:
        return [chunks] if chunks else []
    total, acc = sum(len(c.token_ids) for c in chunks), 0
    for i, c in enumerate(chunks[:-1]):
        acc += len(c.token_ids)
        if acc * 2 >= total:
            return [chunks[: i + 1], chunks[i + 1:]]
    return [chunks[:-1], chunks[-1:]]


def row_order(chunks: tuple[ScheduledChunk, ...],
              placed: list[list[list[ScheduledChunk]]]) -> list[tuple[int, int, int]]:
    """For each token of `chunks`, in the engine's order: (attention call, micro-batch, row in it);
    placed[call] = that call's micro-batches."""
    where = {}
    for call, microbatches in enumerate(placed):
        for m, mb in enumerate(microbatches):
            row = 0
            for c in mb:
                where[c.seq_id] = (call, m, row)
                row += len(c.token_ids)
    return [(r, m, row + i) for c in chunks for r, m, row in [where[c.seq_id]] for i in range(len(c.token_ids))]

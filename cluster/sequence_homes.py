"""Which attention worker holds each sequence's KV cache, and how a step is split among the workers
(torch- and ray-free bookkeeping for cluster/ray_model.py).

`router.shuffle.Homes` keeps each sequence's worker (a new one: seq_id mod A) and plans the moves of
request shuffling; here chunks are placed, a move gets the KV slots it copies, and a step is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.block_manager import context_slots
from cluster.scheduler_config import ScheduledChunk
from router.shuffle import Homes


@dataclass(frozen=True, slots=True)
class KVMove:
    seq_id: int
    src: int  # attention worker holding the KV now
    dst: int
    slots: np.ndarray  # [start] int64 KV slots of the positions computed so far
    cross_node_bytes: int


class SequenceHomes(Homes):
    def __init__(self, num_workers: int, block_size: int, geometry=None, shuffler=None) -> None:
        super().__init__(num_workers, geometry, shuffler)
        self.block_size = block_size

    def place(self, chunks: tuple[ScheduledChunk, ...]) -> list[KVMove]:
        """Assign every chunk's sequence a worker for this step; -> the KV copies to make before it."""
        for c in chunks:
            self.arrive(c.seq_id, fresh=c.start == 0)
        by_seq = {c.seq_id: c for c in chunks}
        moves = self.shuffle({c.seq_id: c.start for c in chunks if c.start > 0})
        return [KVMove(m.seq_id, m.src, m.dst, context_slots(by_seq[m.seq_id].block_ids, by_seq[m.seq_id].start,
                                                             self.block_size), m.cross_node_bytes) for m in moves]

    def split(self, chunks: tuple[ScheduledChunk, ...], parts) -> list[list[list[ScheduledChunk]]]:
        """Chunks -> per worker -> micro-batches balanced by token count; `parts(chunks)` -> 1 or 2."""
        groups: list[list[ScheduledChunk]] = [[] for _ in range(self.num_workers)]
        for c in chunks:
            groups[self.kv_at[c.seq_id]].append(c)
        return [balance(g, parts(g)) for g in groups]

    def observe_step(self, placed: list[list[list[ScheduledChunk]]], hits: list[list[np.ndarray]]) -> None:
        """hits[call][micro-batch]: [T, S] MoE layers at which each token reached each shard."""
        if self.shuffler is None:
            return
        for microbatches, per_mb in zip(placed, hits):
            for mb, h in zip(microbatches, per_mb):
                row = 0
                for c in mb:
                    self.observe(c.seq_id, h[row:row + len(c.token_ids)])
                    row += len(c.token_ids)


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
    where = _places(placed, lambda c: len(c.token_ids))
    return [(r, m, row + i) for c in chunks for r, m, row in [where[c.seq_id]] for i in range(len(c.token_ids))]


def prompt_score_order(chunks: tuple[ScheduledChunk, ...],
                       placed: list[list[list[ScheduledChunk]]]) -> list[tuple[int, int, int, int]]:
    """For each chunk of `chunks` that scores prompt tokens, in the engine's order: (attention call,
    micro-batch, first of its rows among that micro-batch's prompt scores, their number), as
    cluster.batch.build_batch lays a micro-batch's prompt rows out, chunk after chunk; [] (nothing
    mapped) when no chunk scores the prompt, as in most steps."""
    if not any(c.prompt_targets for c in chunks):
        return []
    where = _places(placed, lambda c: len(c.prompt_targets))
    return [(*where[c.seq_id], len(c.prompt_targets)) for c in chunks if c.prompt_targets]


def _places(placed: list[list[list[ScheduledChunk]]], rows) -> dict[int, tuple[int, int, int]]:
    """seq_id -> (attention call, micro-batch, its first row there), a chunk taking `rows(chunk)` rows."""
    where = {}
    for call, microbatches in enumerate(placed):
        for m, mb in enumerate(microbatches):
            first = 0
            for c in mb:
                where[c.seq_id] = (call, m, first)
                first += rows(c)
    return where

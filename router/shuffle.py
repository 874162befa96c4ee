"""Speculative request shuffling (torch-free, numpy): keep each sequence on the attention worker
whose node hosts the expert shards its next tokens are predicted to reach, so that their dispatch
and combine stay on that node.

A token's attention needs its sequence's KV cache, so a token moves with its sequence: moving one
copies the KV of the positions computed so far to the new worker, once. (Moving single tokens layer
by layer, as `moe-serve replay` simulates, needs every worker to hold every sequence's KV: on the
traces measured the replication cost more bytes than the dispatches it saved.)

Prediction: a sequence's next tokens reach the shards its recent tokens reached (temporal
repetition of routes). Per sequence, an exponential moving average over its tokens of `hits[s]`,
the number of MoE layers at which a token had at least one expert on shard s, predicts the
cross-node bytes per token on each worker: one hidden vector out and one back per remote shard
reached. A sequence moves when the bytes the move is predicted to save over the next
`payback_tokens` tokens exceed the KV bytes it copies across nodes, and only while no worker holds
more than `max_load_ratio` x the mean number of sequences. A wrong prediction costs the copy and
leaves dispatch to the normal path: the tokens never change (attention is the same computation on
every worker, and each token's expert outputs are summed in ascending expert id wherever they ran).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


MAX_LOAD_RATIO = 1.25  # default max / mean sequences per worker: the balance the grouping keeps for expert loads


@dataclass(frozen=True, slots=True)
class ShuffleConfig:
    decay: float = 0.95  # weight of the past in a sequence's average, per token observed
    payback_tokens: int = 64  # a move must save the KV bytes it copies within this many tokens
    max_load_ratio: float = MAX_LOAD_RATIO  # sequences per attention worker, max / mean (rounded up)
    min_tokens: int = 1  # tokens observed before a sequence may move

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.payback_tokens <= 0 or self.min_tokens <= 0:
            raise ValueError("payback_tokens and min_tokens must be > 0")
        if self.max_load_ratio < 1.0:
            raise ValueError(f"max_load_ratio must be >= 1, got {self.max_load_ratio}")


@dataclass(frozen=True, slots=True)
class ShuffleGeometry:
    """Where the actors sit and what moving costs."""

    worker_node: tuple[str, ...]  # node of each attention worker
    shard_node: tuple[str, ...]  # node of each expert shard
    vector_bytes: int  # one token's hidden state on the data plane
    kv_bytes_per_token: int  # K and V of one position over all layers
    remote: np.ndarray = field(init=False, repr=False, compare=False)  # [A, S] 1.0: shard s off worker a's node

    def __post_init__(self) -> None:
        object.__setattr__(self, "remote", np.array([[float(w != s) for s in self.shard_node]
                                                     for w in self.worker_node]))

    def move_bytes(self, src: int, dst: int, tokens: int) -> int:
        """Cross-node bytes of copying `tokens` positions of KV from worker src to dst."""
        return 0 if self.worker_node[src] == self.worker_node[dst] else tokens * self.kv_bytes_per_token


@dataclass(slots=True)
class _Seen:
    hits: np.ndarray  # [S] average over tokens
    tokens: int = 0


@dataclass(slots=True)
class RequestShuffler:
    config: ShuffleConfig
    _seen: dict[int, _Seen] = field(default_factory=dict)

    def observe(self, seq_id: int, hits: np.ndarray) -> None:
        """hits: [T, S] for the sequence's T tokens of one step, in position order."""
        hits = np.asarray(hits, dtype=np.float64)
        if hits.shape[0] == 0:
            return
        d = self.config.decay
        weights = (1.0 - d) * d ** np.arange(hits.shape[0] - 1, -1, -1)
        seen = self._seen.get(seq_id)
        if seen is None:  # the first tokens set the average (their weights renormalised)
            seen = self._seen[seq_id] = _Seen(weights @ hits / weights.sum())
        else:
            seen.hits = d ** hits.shape[0] * seen.hits + weights @ hits
        seen.tokens += hits.shape[0]

    def forget(self, seq_id: int) -> None:
        self._seen.pop(seq_id, None)

    def remote_bytes(self, seq_id: int, geometry: ShuffleGeometry) -> np.ndarray | None:
        """[A] predicted cross-node dispatch + combine bytes per token of the sequence on each worker."""
        seen = self._seen.get(seq_id)
        if seen is None:
            return None
        return 2.0 * geometry.vector_bytes * (geometry.remote @ seen.hits)

    def plan(self, running: dict[int, tuple[int, int]], load: list[int],
             geometry: ShuffleGeometry) -> dict[int, int]:
        """running: seq_id -> (its worker, positions in its KV cache); load: sequences per worker
        (all of them, `running` or not). -> seq_id -> new worker, best predicted saving first."""
        load = list(load)
        cap = max(1, math.ceil(self.config.max_load_ratio * sum(load) / len(load)))
        offers = []
        for sid, (here, kv_tokens) in running.items():
            cost = self.remote_bytes(sid, geometry)
            if cost is None or self._seen[sid].tokens < self.config.min_tokens:
                continue
            there = int(np.argmin(cost))
            saving = (cost[here] - cost[there]) * self.config.payback_tokens
            copy = geometry.move_bytes(here, there, kv_tokens)
            if there != here and saving > copy:
                offers.append((saving - copy, sid, here, there))
        moves = {}
        for _, sid, here, there in sorted(offers, reverse=True):
            if load[there] + 1 <= cap:
                load[here] -= 1
                load[there] += 1
                moves[sid] = there
        return moves


@dataclass(frozen=True, slots=True)
class Move:
    seq_id: int
    src: int  # attention worker holding the sequence's KV before the move
    dst: int
    cross_node_bytes: int  # KV copied across nodes (0 between workers of one node)


def start_worker(seq_id: int, num_workers: int) -> int:
    """The attention worker a sequence starts on (and whose prefix cache it reads: cluster/scheduler.py)."""
    return seq_id % num_workers


class Homes:
    """Which attention worker holds each sequence's KV cache, for the live engine
    (cluster/sequence_homes.py) and the replay (router/replay.py) alike. A new sequence goes to worker
    seq_id mod A. With a shuffler (RequestShuffler, or anything with observe / plan / forget) a
    running sequence may move between two steps: `shuffle` plans the moves and applies them."""

    def __init__(self, num_workers: int, geometry: ShuffleGeometry | None = None, shuffler=None) -> None:
        self.num_workers = num_workers
        self.geometry = geometry  # where the actors sit (needed with a shuffler)
        self.shuffler = shuffler
        self.kv_at: dict[int, int] = {}  # seq_id -> the worker holding its KV cache

    def arrive(self, seq_id: int, fresh: bool) -> int:
        """The sequence's worker for the coming step; a fresh one (nothing cached) starts on its home."""
        if fresh or seq_id not in self.kv_at:
            self.kv_at[seq_id] = start_worker(seq_id, self.num_workers)
        return self.kv_at[seq_id]

    def shuffle(self, running: Mapping[int, int]) -> list[Move]:
        """running: seq_id -> positions in its KV cache, for sequences of the coming step already placed
        (arrive). The shuffler's moves, applied; a move copies those positions' KV."""
        if self.shuffler is None or not running:
            return []
        load = np.bincount(list(self.kv_at.values()), minlength=self.num_workers).tolist()
        plan = self.shuffler.plan({sid: (self.kv_at[sid], n) for sid, n in running.items()}, load, self.geometry)
        moves = []
        for sid, dst in plan.items():
            src = self.kv_at[sid]
            moves.append(Move(sid, src, dst, self.geometry.move_bytes(src, dst, running[sid])))
            self.kv_at[sid] = dst
        return moves

    def observe(self, seq_id: int, hits: np.ndarray) -> None:
        """hits: [T, S] at how many MoE layers each of the sequence's tokens of a step reached each shard."""
        if self.shuffler is not None:
            self.shuffler.observe(seq_id, hits)

    def release(self, seq_id: int) -> None:
        self.kv_at.pop(seq_id, None)
        if self.shuffler is not None:
            self.shuffler.forget(seq_id)

"""KV-cache block accounting (torch-free): a free list of fixed-size blocks."""

from __future__ import annotations

import numpy as np


class BlockManager:
    """Hands out whole KV blocks; a sequence reserves every block it may need when admitted. A
    reservation takes the lowest run of consecutive free blocks long enough when there is one, so
    a sequence's keys usually sit in consecutive slots and attention reads them in place
    (cluster/layers.py); else the lowest free blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._is_free = np.ones(num_blocks, dtype=bool)
        self._num_free = num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> list[int]:
        n = self.blocks_for(num_tokens)
        if n > self._num_free:
            raise RuntimeError(f"KV cache: need {n} blocks, {self._num_free} free")
        start = _first_run(self._is_free, n)
        blocks = list(range(start, start + n)) if start is not None else np.flatnonzero(self._is_free)[:n].tolist()
        self._is_free[blocks] = False
        self._num_free -= n
        return blocks

    def free(self, block_ids: list[int]) -> None:
        if not block_ids:
            return
        if self._is_free[block_ids].any():
            raise RuntimeError(f"KV cache: blocks {block_ids} freed twice")
        self._is_free[block_ids] = True
        self._num_free += len(block_ids)


def _first_run(free: np.ndarray, n: int) -> int | None:
    """The first index of the lowest run of `n` consecutive True values in `free`, or None."""
    if n == 0:
        return 0
    edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    fits = np.flatnonzero(ends - starts >= n)
    return int(starts[fits[0]]) if fits.size else None


def context_slots(block_ids: tuple[int, ...], num_tokens: int, block_size: int) -> np.ndarray:
    """The flat KV slot of each of a sequence's first `num_tokens` positions (its whole context:
    built with numpy, since a Python loop over it took 2 ms a step for 8 sequences of 2,000 tokens)."""
    blocks = np.asarray(block_ids[: -(-num_tokens // block_size)], dtype=np.int64)
    return (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:num_tokens]

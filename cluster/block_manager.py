"""KV-cache block accounting (torch-free): a free list of fixed-size blocks."""

from __future__ import annotations

import numpy as np


class BlockManager:
    """Hands out whole KV blocks; a sequence reserves every block it may need when admitted."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"KV cache: need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


def context_slots(block_ids: tuple[int, ...], num_tokens: int, block_size: int) -> np.ndarray:
    """The flat KV slot of each of a sequence's first `num_tokens` positions (its whole context:
    built with numpy, since a Python loop over it took 2 ms a step for 8 sequences of 2,000 tokens)."""
    blocks = np.asarray(block_ids[: -(-num_tokens // block_size)], dtype=np.int64)
    return (blocks[:, None] * block_size + np.arange(block_size)).reshape(-1)[:num_tokens]

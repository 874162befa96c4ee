"""Automatic prefix caching's table (torch-free): which KV block holds which token block, keyed by
the tokens themselves and the block before them, so that a lookup is exact (no hash can collide).

Each cached block is a node of a tree rooted at ROOT: its key is (parent node, its block_size
tokens). A sequence's prompt is matched block by block from the root; the longest run of hits is
K/V that need not be computed again. A block leaves the table when its KV block is evicted (or the
cache is cleared); its descendants then become unreachable and are evicted in their turn.

On a cluster with several attention workers, a block's K/V lives on the worker that computed it:
each worker's blocks hang from a root of their own (`root_of(worker)`, -worker), so a sequence only
matches blocks of the worker it starts on.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

ROOT = 0  # worker 0's root (and the in-process engine's)


def root_of(worker: int) -> int:
    """The root node of that attention worker's cached blocks (nodes made by `register` are > 0)."""
    return -worker
Key = tuple[int, tuple[int, ...]]  # (parent node, the block's tokens)


@dataclass(slots=True)
class PrefixTable:
    entries: dict[Key, tuple[int, int]] = field(default_factory=dict)  # key -> (KV block, node)
    key_of: dict[int, Key] = field(default_factory=dict)  # KV block -> its key
    evictable: OrderedDict[int, None] = field(default_factory=OrderedDict)  # unreferenced cached blocks, LRU first
    _next_node: int = ROOT + 1

    def match(self, token_blocks: list[tuple[int, ...]], root: int = ROOT) -> list[tuple[int, int]]:
        """(KV block, node) of the longest cached prefix of `token_blocks` (full blocks of tokens) below `root`."""
        node, hits = root, []
        for tokens in token_blocks:
            hit = self.entries.get((node, tokens))
            if hit is None:
                break
            hits.append(hit)
            node = hit[1]
        return hits

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Block `block` now holds the K/V of `tokens` after node `parent`; -> the node of that content
        (an existing one when another block already holds it: `block` then stays uncached)."""
        key = (parent, tokens)
        if key in self.entries:
            return self.entries[key][1]
        node, self._next_node = self._next_node, self._next_node + 1
        self.entries[key] = (block, node)
        self.key_of[block] = key
        return node

    def drop(self, block: int) -> None:
        """Forget the content of `block` (it is being reused)."""
        self.entries.pop(self.key_of.pop(block))
        self.evictable.pop(block, None)

    def clear(self) -> list[int]:
        """Forget everything (the cache's contents were lost); -> the blocks that were evictable."""
        freed = list(self.evictable)
        self.entries.clear()
        self.key_of.clear()
        self.evictable.clear()
        return freed

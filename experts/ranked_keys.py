"""RankedKeys (torch-free): a set of cache keys kept in a policy's eviction order, lowest rank first.

A policy's `rank(key)` is an order that does not change while the key is not touched and never
falls when it is (LRU's last use; LFU's use count and last use; the score policy's log-score plus
its decay times the step it was updated, since a use only adds to the score). So the set keeps a
min-heap of (rank when pushed, entry number, key) and re-ranks lazily: an entry that surfaces with
a rank below its key's current one is pushed again with the current rank; one that surfaces with
its current rank is the lowest, since every other entry's current rank is at least its pushed one.
A touch then costs the set nothing, and an eviction O(log n) amortised, instead of ranking every
resident key. An entry of a key no longer in the set, or older than its key's latest, is dropped.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Hashable

Rank = Callable[[Hashable], object]  # any totally ordered value; lower leaves first; never falls


class RankedKeys:
    def __init__(self, rank: Rank) -> None:
        self.rank = rank
        self._entry: dict[Hashable, int] = {}  # key -> its latest entry's number
        self._heap: list[tuple[object, int, Hashable]] = []
        self._numbers = itertools.count()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def add(self, key: Hashable) -> None:
        self._push(key)
        if len(self._heap) > 4 * len(self._entry) + 64:  # mostly dropped entries: rebuild
            self._heap = [(self.rank(k), n, k) for k, n in self._entry.items()]
            heapq.heapify(self._heap)

    def discard(self, key: Hashable) -> None:
        self._entry.pop(key, None)

    def lowest(self) -> Hashable | None:
        """The key of lowest current rank (ties: the one ranked first); None if the set is empty."""
        while self._heap:
            pushed, number, key = self._heap[0]
            if self._entry.get(key) != number:
                heapq.heappop(self._heap)  # gone, or pushed again since
            elif self.rank(key) != pushed:
                heapq.heappop(self._heap)
                self._push(key)  # touched since: re-ranked now
            else:
                return key
        return None

    def _push(self, key: Hashable) -> None:
        number = self._entry[key] = next(self._numbers)
        heapq.heappush(self._heap, (self.rank(key), number, key))

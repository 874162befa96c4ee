"""RankedKeys (torch-free): a set of cache keys kept in a policy's eviction order, lowest rank first.

A policy's `rank(key)` is an order that does not change while the key is not touched (LRU's last
use; the score policy's log-score plus its decay times the step it was updated), so the set keeps a
min-heap of (rank, entry number, key) and finds the victim in O(log n) instead of ranking every
resident key at every eviction. The owner calls `refresh(key)` after every change to a key's rank;
an entry older than its key's latest, or of a key no longer in the set, is dropped when it surfaces.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Collection, Hashable, Iterator

Rank = Callable[[Hashable], object]  # any totally ordered value; lower leaves first


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

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entry)

    def add(self, key: Hashable) -> None:
        self._push(key)

    def refresh(self, key: Hashable) -> None:
        """`key`'s rank changed: re-rank it (nothing if it is not in the set)."""
        if key in self._entry:
            self._push(key)

    def discard(self, key: Hashable) -> None:
        self._entry.pop(key, None)

    def lowest(self, skip: Collection[Hashable] = ()) -> Hashable | None:
        """The key of lowest rank not in `skip` (ties: the one ranked first); None if there is none."""
        skipped, found = [], None
        while self._heap:
            _, number, key = self._heap[0]
            if self._entry.get(key) != number:
                heapq.heappop(self._heap)  # stale: re-ranked or gone
            elif key in skip:
                skipped.append(heapq.heappop(self._heap))
            else:
                found = key
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def _push(self, key: Hashable) -> None:
        number = self._entry[key] = next(self._numbers)
        heapq.heappush(self._heap, (self.rank(key), number, key))
        if len(self._heap) > 4 * len(self._entry) + 64:  # mostly stale entries: rebuild
            self._heap = [(self.rank(k), n, k) for k, n in self._entry.items()]
            heapq.heapify(self._heap)

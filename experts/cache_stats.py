"""CacheStats: the expert cache's counters (experts/expert_cache.py), summed over shards and steps."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0  # misses moved into the fast tier
    cpu_computed: int = 0  # misses computed where they lie
    bytes_moved: int = 0
    prefetches: int = 0  # experts loaded ahead of their layer
    prefetch_used: int = 0  # of those, used before being evicted

    def add(self, counts: Mapping[str, Any]) -> None:
        """Add the counters in `counts` (an as_dict() result, or some of the field names)."""
        for name, value in counts.items():
            if name in _COUNTERS:
                setattr(self, name, getattr(self, name) + int(value))

    @classmethod
    def summed(cls, stats: Iterable[Mapping[str, Any]]) -> "CacheStats":
        """The counters of several as_dict() results added up (the shards of one step)."""
        total = cls()
        for counts in stats:
            total.add(counts)
        return total

    def describe(self) -> str:
        d = self.as_dict()
        rate = "-" if d["hit_rate"] is None else f"{d['hit_rate']:.1%}"
        line = (f"expert cache: hit rate {rate} ({self.hits} of {self.hits + self.misses} lookups), "
                f"{self.loads} loaded, {self.cpu_computed} computed where they lie, "
                f"{self.bytes_moved / 2**20:.1f} MiB moved")
        if self.prefetches:
            line += f"; prefetch: {self.prefetches} loaded ahead, {d['prefetch_accuracy']:.1%} of them used"
        return line

    def as_dict(self) -> dict:
        looked_up = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "loads": self.loads, "cpu_computed": self.cpu_computed,
                "bytes_moved": self.bytes_moved, "hit_rate": self.hits / looked_up if looked_up else None,
                "prefetches": self.prefetches, "prefetch_used": self.prefetch_used,
                "prefetch_accuracy": self.prefetch_used / self.prefetches if self.prefetches else None}


_COUNTERS = frozenset(f.name for f in fields(CacheStats))

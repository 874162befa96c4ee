"""Expert-cache policies (torch-free) behind one interface: which resident expert leaves the fast tier.

Keys are (layer, expert). The cache calls `touch` on every use of an expert (hit, demand load or
prefetch) with the router's gate weight for it (summed over the step's tokens) and asks `victim`
to choose among the resident keys it may evict; `admits` says whether a missed expert may enter
the fast tier at all. Time `now` is the decode step.

- lru: least recently used leaves (mixtral-offloading's baseline).
- lfu: least often used leaves (uses counted over the whole run, ties by recency).
- score: HybriMoE-style score: gate weight summed over uses, decayed with a half-life in steps, so
  it combines frequency, recency and the router's confidence; the lowest score leaves. Admission
  (as TinyLFU): a missed expert whose score is below the lowest resident's stays out (the caller
  computes it where it lies); every use, hit or miss, adds to its score, so a rising one gets in.
- static: a fixed set (the most popular experts of a profiling run, as in Fiddler); nothing else
  is ever admitted, so nothing is evicted.
- adaptive: follows whichever of score and lru would have hit more lately. Each runs a shadow
  fast tier (keys only, the real tier's capacity and layout) over the same uses, its hits decayed
  with a half-life in uses; the real tier evicts and admits as the leader would (set dueling, as
  ARC and LeCaR choose between recency and frequency). Score's admission filter resists the scans
  of a batch that needs more experts than the tier holds; where a step's experts fit and the next
  token mostly reuses the last one's (Mixtral's routing), recency wins and lru leads.
- belady: of the resident keys and the one coming in, the one used again furthest in the future
  stays out (the optimum, bypass included; replay only).

`touch(..., demand=False)` marks a prefetch: it updates a policy's scores but is not a use the
adaptive policy's shadow tiers count.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Mapping, Sequence

from experts.ranked_keys import RankedKeys

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu", "score", "adaptive", "static", "belady")
ONLINE_POLICIES = ("lru", "lfu", "score", "adaptive")  # need neither a profile (static) nor the future (belady)
SCORE_HALF_LIFE_STEPS = 16.0  # decode steps
ADAPTIVE_HALF_LIFE_USES = 1024.0  # the adaptive policy's memory of its candidates' hits


class CachePolicy(ABC):
    name = "policy"

    def touch(self, key: Key, now: int, weight: float, demand: bool = True) -> None:
        """`key` was used (or loaded ahead: demand False) at `now`; `weight`: its gate weight summed
        over the step's tokens."""

    def admits(self, key: Key) -> bool:
        return True

    def rank(self, key: Key) -> object:
        """An eviction order that stays put while `key` is not touched and never falls when it is
        (lowest leaves first), for experts.ranked_keys; the static and Belady policies have none."""
        raise NotImplementedError(f"the {self.name} cache policy has no time-invariant rank")

    def keeps_out(self, incoming: Key, lowest: Key) -> bool:
        """Whether `incoming` stays out rather than evict `lowest`, the resident key of lowest rank."""
        return False

    @abstractmethod
    def victim(self, candidates: Sequence[Key], now: int, incoming: Key | None = None) -> Key:
        """The key to evict among `candidates` (non-empty); a policy may return `incoming`, the key
        asking for room, to keep it out instead."""


class LRUPolicy(CachePolicy):
    name = "lru"

    def __init__(self) -> None:
        self.last: dict[Key, int] = {}

    def touch(self, key: Key, now: int, weight: float, demand: bool = True) -> None:
        self.last[key] = now

    def rank(self, key: Key) -> int:
        return self.last.get(key, -1)

    def victim(self, candidates: Sequence[Key], now: int, incoming: Key | None = None) -> Key:
        return min(candidates, key=self.rank)


class LFUPolicy(LRUPolicy):
    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[Key, int] = {}

    def touch(self, key: Key, now: int, weight: float, demand: bool = True) -> None:
        super().touch(key, now, weight, demand)
        self.uses[key] = self.uses.get(key, 0) + 1

    def rank(self, key: Key) -> tuple[int, int]:
        return self.uses.get(key, 0), self.last.get(key, -1)


class ScorePolicy(CachePolicy):
    """Scores decay by exp(-decay * steps), all at the same rate, so the order of two untouched keys
    never changes: each key keeps log(score) + decay * (step of its last update), its rank; the
    score at `now` is exp(rank - decay * now)."""

    name = "score"

    def __init__(self, half_life: float = 16.0) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.decay = math.log(2) / half_life
        self.log_score: dict[Key, float] = {}  # key -> its rank

    def value(self, key: Key, now: int) -> float:
        return math.exp(self.rank(key) - self.decay * now)

    def rank(self, key: Key) -> float:
        return self.log_score.get(key, -math.inf)

    def touch(self, key: Key, now: int, weight: float, demand: bool = True) -> None:
        if weight <= 0:  # adds nothing: the rank stays exactly as it is (ranks never fall)
            self.log_score.setdefault(key, -math.inf)
            return
        rank = math.log(self.value(key, now) + weight) + self.decay * now
        self.log_score[key] = max(rank, self.rank(key))  # rounding may not lower it either

    def keeps_out(self, incoming: Key, lowest: Key) -> bool:
        return self.rank(incoming) < self.rank(lowest)

    def victim(self, candidates: Sequence[Key], now: int, incoming: Key | None = None) -> Key:
        lowest = min(candidates, key=self.rank)
        return incoming if incoming is not None and self.keeps_out(incoming, lowest) else lowest


class AdaptivePolicy(CachePolicy):
    """`candidates` in order of preference on a tie (the first leads at the start); `capacity`: the
    fast tier's experts, one tier over every layer (an int, as the replay's) or per layer (a function
    layer -> slots, as the engine's cache)."""

    name = "adaptive"

    def __init__(self, candidates: Sequence[CachePolicy], capacity: int | Callable[[int], int],
                 half_life_uses: float = ADAPTIVE_HALF_LIFE_USES) -> None:
        if not candidates or half_life_uses <= 0:
            raise ValueError(f"need candidates and half_life_uses > 0, got {len(candidates)}, {half_life_uses}")
        self.candidates = list(candidates)
        self.capacity = capacity
        self.shadows: dict[int | None, list[RankedKeys]] = {}  # layer (None: one tier) -> a tier per candidate
        self.hits = [0.0] * len(self.candidates)  # decayed shadow hits
        self.keep = 0.5 ** (1.0 / half_life_uses)
        self.leader = 0

    @property
    def leading(self) -> CachePolicy:
        return self.candidates[self.leader]

    def _tiers(self, key: Key) -> tuple[list[RankedKeys], int]:
        """The candidates' shadow tiers holding `key`'s layer, and their capacity."""
        layer = None if isinstance(self.capacity, int) else key[0]
        tiers = self.shadows.get(layer)
        if tiers is None:
            tiers = self.shadows[layer] = [RankedKeys(policy.rank) for policy in self.candidates]
        return tiers, self.capacity if layer is None else self.capacity(layer)

    def touch(self, key: Key, now: int, weight: float, demand: bool = True) -> None:
        if demand:
            tiers, capacity = self._tiers(key)
            hits = self.hits
            for i, policy in enumerate(self.candidates):  # each decides on its own state before the use
                tier = tiers[i]
                hits[i] *= self.keep
                if key in tier:
                    hits[i] += 1.0
                elif capacity > 0 and policy.admits(key):
                    while len(tier) >= capacity:  # the layout may have shrunk since
                        lowest = tier.lowest()
                        if policy.keeps_out(key, lowest):
                            break
                        tier.discard(lowest)
                    else:
                        tier.add(key)
            for i in range(len(hits)):
                if hits[i] > hits[self.leader]:
                    self.leader = i
        for policy in self.candidates:
            policy.touch(key, now, weight, demand)

    def admits(self, key: Key) -> bool:
        return self.leading.admits(key)

    def victim(self, candidates: Sequence[Key], now: int, incoming: Key | None = None) -> Key:
        return self.leading.victim(candidates, now, incoming)


class StaticPolicy(CachePolicy):
    name = "static"

    def __init__(self, resident: Iterable[Key]) -> None:
        self.resident = frozenset(resident)

    def admits(self, key: Key) -> bool:
        return key in self.resident

    def victim(self, candidates: Sequence[Key], now: int, incoming: Key | None = None) -> Key:
        others = [k for k in candidates if k not in self.resident]
        return others[0] if others else candidates[0]


class BeladyPolicy(CachePolicy):
    """`uses[key]`: the ascending steps at which key is used, over the whole replay (the future)."""

    name = "belady"

    def __init__(self, uses: Mapping[Key, Sequence[int]]) -> None:
        self.uses = {k: list(v) for k, v in uses.items()}

    def next_use(self, key: Key, now: int) -> float:
        steps = self.uses.get(key, ())
        i = bisect.bisect_right(steps, now)
        return steps[i] if i < len(steps) else math.inf

    def victim(self, candidates: Sequence[Key], now: int, incoming: Key | None = None) -> Key:
        pool = list(candidates) if incoming is None else [*candidates, incoming]
        return max(pool, key=lambda k: self.next_use(k, now))


def most_popular(counts: Mapping[Key, float], capacity: int) -> list[Key]:
    """The `capacity` keys with the highest counts (ties: lower key first): the static policy's set."""
    return sorted(counts, key=lambda k: (-counts[k], k))[:capacity]


def online_policy(name: str, ticks_per_step: float, capacity: int | Callable[[int], int] | None = None) -> CachePolicy:
    """An online policy by name; `ticks_per_step`: how far the caller's clock moves per decode step;
    `capacity`: the fast tier's, for the adaptive policy's shadow tiers (required there)."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "score":
        return ScorePolicy(half_life=SCORE_HALF_LIFE_STEPS * ticks_per_step)
    if name == "adaptive":
        if capacity is None:
            raise ValueError("the adaptive cache policy needs the fast tier's capacity")
        return AdaptivePolicy([online_policy("score", ticks_per_step), LRUPolicy()], capacity)
    raise ValueError(f"unknown online cache policy {name!r} (known: {', '.join(ONLINE_POLICIES)})")

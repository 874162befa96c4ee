"""RankedKeys against ranking every key at every eviction, under the policies' own ranks."""

from __future__ import annotations

import random

import pytest

from experts.cache_policy import LFUPolicy, LRUPolicy, ScorePolicy, StaticPolicy
from experts.ranked_keys import RankedKeys


@pytest.mark.parametrize("make", [LRUPolicy, LFUPolicy, lambda: ScorePolicy(half_life=3.0)], ids=["lru", "lfu", "score"])
def test_lowest_is_the_policys_victim_through_touches_adds_and_evictions(make):
    rng, policy = random.Random(0), make()
    keys, tier = [(0, e) for e in range(40)], RankedKeys(policy.rank)
    for now in range(3000):
        key = rng.choice(keys[:10] if rng.random() < 0.6 else keys)  # a hot set over a long tail
        policy.touch(key, now, rng.random())
        if key not in tier and len(tier) >= 12:
            skip = set(rng.sample(sorted(tier), 3))
            lowest = tier.lowest(skip)
            assert lowest not in skip and policy.rank(lowest) == min(policy.rank(k) for k in tier if k not in skip)
            tier.discard(lowest)
            tier.add(key)
        elif key not in tier:
            tier.add(key)
        tier.refresh(key)
    assert len(tier) == 12 and len(tier._heap) <= 4 * 12 + 64  # stale entries are dropped as they pile up


def test_a_key_not_refreshed_after_a_touch_keeps_its_old_place_and_gone_keys_never_return():
    lru = LRUPolicy()
    for now, e in enumerate([0, 1, 2]):
        lru.touch((0, e), now, 1.0)
    tier = RankedKeys(lru.rank)
    for e in (0, 1, 2):
        tier.add((0, e))
    lru.touch((0, 0), 3, 1.0)
    assert tier.lowest() == (0, 0)  # the owner did not refresh it
    tier.refresh((0, 0))
    assert tier.lowest() == (0, 1)
    tier.discard((0, 1))
    tier.refresh((0, 1))  # not in the set: nothing
    assert tier.lowest() == (0, 2) and tier.lowest({(0, 2)}) == (0, 0) and tier.lowest({(0, 0), (0, 2)}) is None
    assert sorted(tier) == [(0, 0), (0, 2)]


def test_policies_without_a_time_invariant_rank_say_so():
    with pytest.raises(NotImplementedError, match="static"):
        StaticPolicy([(0, 0)]).rank((0, 0))

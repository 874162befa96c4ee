"""RankedKeys against ranking every key at every eviction, under the policies' own ranks."""

from __future__ import annotations

import random

import pytest

from experts.cache_policy import LFUPolicy, LRUPolicy, ScorePolicy, StaticPolicy
from experts.ranked_keys import RankedKeys


@pytest.mark.parametrize("make", [LRUPolicy, LFUPolicy, lambda: ScorePolicy(half_life=3.0)], ids=["lru", "lfu", "score"])
def test_lowest_is_the_policys_victim_through_touches_adds_and_evictions(make):
    """Keys are touched (their ranks rise) without the set being told; the lowest is still exact."""
    rng, policy = random.Random(0), make()
    keys, tier = [(0, e) for e in range(40)], RankedKeys(policy.rank)
    for now in range(3000):
        key = rng.choice(keys[:10] if rng.random() < 0.6 else keys)  # a hot set over a long tail
        policy.touch(key, now, rng.random() if rng.random() < 0.9 else 0.0)  # some uses add nothing
        if key not in tier and len(tier) >= 12:
            lowest = tier.lowest()
            assert policy.rank(lowest) == min(policy.rank(k) for k in keys if k in tier)
            tier.discard(lowest)
        if key not in tier:
            tier.add(key)
    assert len(tier) == 12 and len(tier._heap) <= 4 * 12 + 64  # dropped entries do not pile up


def test_ties_go_to_the_key_ranked_first_and_gone_keys_never_return():
    lru = LRUPolicy()
    for e in (0, 1, 2):
        lru.touch((0, e), 0, 1.0)  # one tie
    tier = RankedKeys(lru.rank)
    for e in (1, 0, 2):
        tier.add((0, e))
    assert tier.lowest() == (0, 1)
    lru.touch((0, 1), 1, 1.0)
    assert tier.lowest() == (0, 0)  # (0, 1) was re-ranked when it surfaced
    tier.discard((0, 0))
    assert tier.lowest() == (0, 2) and len(tier) == 2 and (0, 0) not in tier
    tier.discard((0, 2))
    tier.discard((0, 1))
    assert tier.lowest() is None


def test_a_score_never_falls_when_a_use_adds_little_or_nothing():
    """exp then log may round a rank down when the weight added is tiny beside the score; the lazy
    heap needs ranks that never fall."""
    rng, score = random.Random(1), ScorePolicy(half_life=5.0)
    for e in range(50):
        score.touch((0, e), 0, 10 ** rng.uniform(0, 3))
    for now in range(1, 400):
        key = (0, now % 50)
        before = score.rank(key)
        score.touch(key, now, 10 ** rng.uniform(-20, -14) if now % 7 else 0.0)
        assert score.rank(key) >= before


def test_policies_without_a_time_invariant_rank_say_so():
    with pytest.raises(NotImplementedError, match="static"):
        StaticPolicy([(0, 0)]).rank((0, 0))

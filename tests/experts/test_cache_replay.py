"""Expert-cache policies and their replay: by hand, against the optimum, and with a predictable chain."""

from __future__ import annotations

import random

import pytest

from experts.cache_policy import (AdaptivePolicy, BeladyPolicy, CachePolicy, LFUPolicy, LRUPolicy, ScorePolicy,
                                  StaticPolicy, most_popular, online_policy)
from experts.cache_replay import ExpertCache, decode_steps, replay_cache
from experts.cost_model import ExpertCostModel, LinearTime
from router.traces import RouteRecord


def trace(routes: dict[str, list[list[tuple[int, ...]]]]) -> list[RouteRecord]:
    """routes[request][pos][layer] = experts -> records with equal gate weights."""
    return [RouteRecord(req, pos, layer, ids, tuple(1.0 / len(ids) for _ in ids))
            for req, tokens in routes.items() for pos, layers in enumerate(tokens) for layer, ids in enumerate(layers)]


def test_policies_pick_their_victims_by_hand():
    a, b, c = (0, 0), (0, 1), (0, 2)
    lru, lfu, score = LRUPolicy(), LFUPolicy(), ScorePolicy(half_life=1.0)
    for policy in (lru, lfu, score):
        for now, (key, w) in enumerate([(a, 1.0), (a, 1.0), (a, 1.0), (b, 0.1), (c, 0.9)]):
            policy.touch(key, now, w)
    assert lru.victim([a, b, c], 5) == a  # used longest ago
    assert lfu.victim([a, b, c], 5) == b  # used once, before c
    assert score.victim([a, b, c], 5) == b  # a decayed from 3 uses; b's one use had a low gate weight
    assert score.value(a, 5) == pytest.approx(1.0 * 0.5 ** 3 + 0.5 ** 4 + 0.5 ** 5)
    d = (0, 3)
    assert score.victim([a, c], 5, incoming=d) == d  # never used: it stays out (admission)
    score.touch(d, 5, 0.1)
    assert score.victim([a, c], 5, incoming=d) == d  # 0.1 is below a's 0.22
    score.touch(d, 5, 0.2)
    assert score.victim([a, c], 5, incoming=d) == a  # used again (0.3): it beats the lowest resident
    static = StaticPolicy([a, b])
    assert static.admits(a) and not static.admits(c) and static.victim([a, c], 0) == c
    belady = BeladyPolicy({a: [1, 9], b: [2, 3], c: [4]})
    assert belady.victim([a, b, c], 3) == b and belady.victim([a, c], 3) == a  # b is never used again
    assert belady.victim([a], 3, incoming=c) == a and belady.victim([c], 3, incoming=a) == a  # bypass
    assert most_popular({a: 3, b: 5, c: 3}, 2) == [b, a]


def test_steps_group_tokens_by_position_and_sum_gate_weights():
    steps, layers, experts = decode_steps(trace({"r0": [[(0, 1)], [(1, 2)]], "r1": [[(1, 3)]]}))
    assert (layers, experts, len(steps)) == (1, 4, 2)
    assert steps[0].tokens == (("r0", 0), ("r1", 0)) and steps[0].needs[0] == {0: 0.5, 1: 1.0, 3: 0.5}
    assert steps[1].needs[0] == {1: 0.5, 2: 0.5}


def random_trace(seed: int, layers: int = 3, experts: int = 6, k: int = 2, tokens: int = 60) -> list[RouteRecord]:
    rng = random.Random(seed)
    hot = [rng.sample(range(experts), 3) for _ in range(layers)]  # skewed popularity per layer
    return trace({f"r{r}": [[tuple(rng.sample(hot[l] if rng.random() < 0.7 else range(experts), k))
                             for l in range(layers)] for _ in range(tokens)] for r in range(2)})


@pytest.mark.parametrize("seed", range(4))
def test_belady_is_the_limit_and_a_full_cache_always_hits(seed):
    records = random_trace(seed)
    report = replay_cache(records, 0.34)
    demand = {name: p for name, p in report["policies"].items() if "prefetch" not in name}
    # Optimal from its own state when counting starts: at most one miss per slot behind any other.
    slack = report["capacity_experts"]
    assert all(demand["belady"]["hits"] >= p["hits"] - slack for p in demand.values())
    assert demand["belady"]["hits"] > max(p["hits"] for name, p in demand.items() if name != "belady") - slack
    assert demand["belady"]["hit_rate"] > demand["lru"]["hit_rate"]
    assert report["capacity_experts"] == round(0.34 * 18)
    full = replay_cache(records, 1.0)["policies"]
    assert full["lru"]["hit_rate"] == 1.0 and full["belady"]["demand_misses_per_token"] == 0.0
    assert full["lru"]["bytes_moved_per_token"] == 0.0  # every expert was loaded while warming up


def test_prefetch_of_a_predictable_chain_removes_demand_misses():
    """Layer l+1's expert is a function of layer l's: the affinity predictor learns it while warming up."""
    rng = random.Random(0)
    tokens = []
    for _ in range(400):
        first = rng.randrange(8)
        tokens.append([(first,), ((first * 3 + 1) % 8,), ((first * 5 + 2) % 8,), ((first + 4) % 8,)])
    records = trace({"r": tokens})
    # The link moves one expert per layer's dense work: prefetch can keep up.
    cost = ExpertCostModel(expert_bytes=10**6, transfer_s=10**6 / 60e9, fast=LinearTime(10**6 / 3000e9, 0.0),
                           slow=LinearTime(10**6 / 60e9, 0.0), overlap=True)
    report = replay_cache(records, 0.25, cost=cost, dense_layer_s=10**6 / 60e9)
    lru, prefetched = report["policies"]["lru"], report["policies"]["lru+prefetch"]
    assert prefetched["demand_misses_per_token"] <= 0.5 * lru["demand_misses_per_token"]
    assert prefetched["prefetch_accuracy"] > 0.9
    assert prefetched["time_per_token_s"] < lru["time_per_token_s"]
    oracle = report["policies"]["lru+oracle prefetch"]  # the next layer's real experts, loaded ahead
    assert oracle["prefetch_accuracy"] == 1.0
    assert oracle["demand_misses_per_token"] <= prefetched["demand_misses_per_token"]


def test_oracle_prefetch_is_bounded_by_the_link():
    """A perfect predictor helps only as far as the link has time: with a transfer 1000x longer than
    a layer nothing is loaded ahead and the misses are LRU's; with one 10x shorter they fall."""
    records = random_trace(1)

    def oracle_and_lru(transfer_s: float) -> tuple[dict, dict]:
        cost = ExpertCostModel(expert_bytes=10**6, transfer_s=transfer_s, fast=LinearTime(1e-6, 0.0),
                               slow=LinearTime(1e-3, 0.0), overlap=True)
        policies = replay_cache(records, 0.34, cost=cost, dense_layer_s=1e-3)["policies"]
        return policies["lru+oracle prefetch"], policies["lru"]

    oracle, lru = oracle_and_lru(1.0)
    assert oracle["prefetch_accuracy"] is None and oracle["demand_misses_per_token"] == lru["demand_misses_per_token"]
    oracle, lru = oracle_and_lru(1e-4)
    assert oracle["prefetch_accuracy"] == 1.0
    assert oracle["demand_misses_per_token"] < 0.9 * lru["demand_misses_per_token"]


def test_a_layer_with_idle_link_time_for_several_transfers_prefetches_several():
    """Random routes (two of 8 experts at each of 4 layers), a link 1000x faster than a layer: a
    perfect predictor loads both of the next layer's experts ahead, so only layer 0 ever misses."""
    rng = random.Random(3)
    records = trace({"r": [[tuple(rng.sample(range(8), 2)) for _ in range(4)] for _ in range(200)]})
    cost = ExpertCostModel(expert_bytes=10**6, transfer_s=1e-6, fast=LinearTime(1e-6, 0.0),
                           slow=LinearTime(1e-3, 0.0), overlap=True)
    policies = replay_cache(records, 0.25, cost=cost, dense_layer_s=1e-3)["policies"]
    assert policies["lru"]["demand_misses_per_token"] > 4
    assert 0 < policies["lru+oracle prefetch"]["demand_misses_per_token"] <= 2  # layer 0's two at most


def test_bad_arguments_are_refused():
    records = random_trace(0)
    with pytest.raises(ValueError, match="capacity"):
        replay_cache(records, 0.0)
    with pytest.raises(ValueError, match="too few"):
        replay_cache(trace({"r": [[(0,)]]}), 0.5)
    with pytest.raises(ValueError, match="dense_layer_s"):
        replay_cache(records, 0.5, dense_layer_s=-1.0)


def test_cli_prints_every_policy_as_json(tmp_path):
    import json
    import subprocess
    import sys

    from router.traces import write_record

    path = tmp_path / "t.jsonl"
    with path.open("w") as f:
        for record in random_trace(1):
            write_record(f, record)
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "replay", "--trace", str(path), "--cache-capacity",
                          "0.5", "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    policies = json.loads(res.stdout)["policies"]
    assert set(policies) == {"lru", "lfu", "score", "adaptive", "static", "belady", "lru+prefetch", "lfu+prefetch",
                             "score+prefetch", "adaptive+prefetch", "static+prefetch",
                             "lru+oracle prefetch", "adaptive+oracle prefetch"}
    assert all({"hit_rate", "bytes_moved_per_token", "demand_misses_per_token"} <= set(p) for p in policies.values())
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "replay", "--trace", str(path), "--cache-capacity",
                          "1.5"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "capacity" in res.stderr


def test_replay_uses_a_cost_model_calibrated_on_this_node(tmp_path, tiny_model):
    import json
    import subprocess
    import sys

    from router.traces import write_record

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120)

    res = cli("calibrate", "--model", str(tiny_model("olmoe")), "--json")
    assert res.returncode == 0, res.stderr
    measured = ExpertCostModel.from_dict(json.loads(res.stdout))
    assert measured.fast_device == "cpu" and measured.transfer_s > 0
    model_file, trace_file = tmp_path / "cost.json", tmp_path / "t.jsonl"
    model_file.write_text(res.stdout)
    with trace_file.open("w") as f:
        for record in random_trace(2):
            write_record(f, record)
    res = cli("replay", "--trace", str(trace_file), "--cache-capacity", "0.5", "--json", "--cost-model",
              str(model_file), "--expert-bytes", str(4 * measured.expert_bytes))
    assert res.returncode == 0, res.stderr
    assert ExpertCostModel.from_dict(json.loads(res.stdout)["cost_model"]) == measured.scaled(4 * measured.expert_bytes)
    model_file.write_text('{"expert_bytes": 5}')
    res = cli("replay", "--trace", str(trace_file), "--cache-capacity", "0.5", "--cost-model", str(model_file))
    assert res.returncode == 2 and "moe-serve calibrate" in res.stderr


def test_a_load_never_evicts_an_expert_the_same_step_still_needs():
    """Steps alternate {2, 3} and {0, 2} on one layer with two slots: expert 2 is LRU's oldest when
    the other expert's miss needs room, but the router has already asked for it, so it stays."""
    records = trace({"r": [[(2, 3)] if pos % 2 == 0 else [(0, 2)] for pos in range(40)]})
    report = replay_cache(records, 0.5)
    assert report["capacity_experts"] == 2
    for name in ("lru", "lfu"):
        assert report["policies"][name]["hit_rate"] == 0.5, name  # expert 2 hits every step, the other never
    assert report["policies"]["score"]["hit_rate"] >= 0.5
    assert report["policies"]["belady"]["hit_rate"] == 0.75  # it also keeps 3 and computes 0 where it lies


def hits(policy: CachePolicy, experts: list[int], capacity: int = 2) -> int:
    """One layer's experts used one per tick through a `capacity`-expert fast tier."""
    cache = ExpertCache(policy, capacity)
    for now, e in enumerate(experts):
        cache.use((0, e), now, 1.0, {(0, e)})
    return cache.tally.hits


def test_adaptive_follows_whichever_policy_would_have_hit_more():
    # A scan: two hot experts between single uses of the others. LRU evicts a hot one for every scan
    # expert and never hits; score keeps the scan out; adaptive stays with score.
    scan = [e for i in range(60) for e in (0, 1, 2 + i % 6)]
    assert hits(LRUPolicy(), scan) == 0
    score = hits(online_policy("score", ticks_per_step=1), scan)
    assert score > 100
    adaptive = online_policy("adaptive", ticks_per_step=1, capacity=2)
    assert hits(adaptive, scan) == score and isinstance(adaptive.leading, ScorePolicy)
    # A phase change: 0 and 1 were hot, now 2 and 3 are. Score keeps the old pair until it has
    # decayed below the new one (half-life 16 ticks); LRU lets the new pair in at once. Per-layer
    # capacity (a function, as the engine's cache) works the same as one tier.
    phases = [0, 1] * 100 + [2, 3] * 100
    lru, score = hits(LRUPolicy(), phases), hits(online_policy("score", ticks_per_step=1), phases)
    assert lru == 198 + 198 and score < lru - 10  # two misses per phase
    adaptive = online_policy("adaptive", ticks_per_step=1, capacity=lambda layer: 2 if layer == 0 else 0)
    # It misses as score does until LRU's shadow tier has hit once more than score's, then follows LRU.
    assert lru - 5 <= hits(adaptive, phases) <= lru and isinstance(adaptive.leading, LRUPolicy)


def test_adaptive_shadow_tiers_count_uses_not_prefetches():
    policy = AdaptivePolicy([ScorePolicy(half_life=4.0), LRUPolicy()], capacity=1)
    policy.touch((0, 0), 0, 1.0)
    policy.touch((0, 0), 1, 1.0, demand=False)  # loaded ahead: neither shadow tier counts it
    assert policy.hits == [0.0, 0.0]
    score, lru = policy.candidates
    assert lru.last[(0, 0)] == 1 and score.value((0, 0), 1) == pytest.approx(0.5 ** 0.25 + 1.0)  # but both saw it
    policy.touch((0, 0), 2, 1.0)
    assert policy.hits == [1.0, 1.0]  # both let it in at its first use
    with pytest.raises(ValueError, match="candidates"):
        AdaptivePolicy([], capacity=1)
    with pytest.raises(ValueError, match="capacity"):
        online_policy("adaptive", ticks_per_step=1)

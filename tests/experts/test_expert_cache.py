"""The live expert cache: a fraction of the experts resident, the same tokens as with all of them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.async_engine import AsyncLLMEngine
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from experts.calibrate import calibrate
from experts.checkpoint import Checkpoint
from experts.config import load_spec
from experts.cost_model import ExpertCostModel, LinearTime
from experts.expert_cache import CachedExperts, ExpertCacheConfig
from experts.slow_tier import CheckpointTier, HostTier
from experts.tiny import FAMILIES

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 3, 7, 200, 9]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)


def run(model, params, **cache) -> tuple[list[tuple[int, ...]], LLMEngine]:
    engine = LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=512, block_size=4, **cache))
    return [o.token_ids for o in engine.generate(PROMPTS, params)], engine


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fraction, policy", [(0.25, "score"), (0.25, "adaptive"), (0.5, "lru"), (0.5, "lfu")])
def test_tokens_match_the_all_resident_engine(tiny_model, family, fraction, policy):
    model = tiny_model(family)
    for params in (GREEDY, SAMPLED):
        want, _ = run(model, params)
        got, engine = run(model, params, expert_cache_fraction=fraction, expert_cache_policy=policy)
        assert got == want
        stats = engine.model.experts.stats
        assert stats.misses > 0 and stats.hits > 0 and stats.bytes_moved > 0


def test_fast_tier_holds_its_budget_and_overflow_is_computed_once(tiny_model):
    model = tiny_model("olmoe")
    _, full = run(model, GREEDY)
    _, cached = run(model, GREEDY, expert_cache_fraction=0.25)
    spec = cached.spec
    slots = ExpertCacheConfig(0.25).slots(spec.num_experts)
    assert cached.model.experts.nbytes() == full.model.experts.nbytes() * slots // spec.num_experts
    # Prefill routes the prompts' tokens to more experts than a layer has slots: some are not kept.
    stats = cached.model.experts.stats
    assert stats.loads < stats.misses
    assert all(len(layer.resident) <= slots for layer in cached.model.experts.layers.values())


def test_hit_rate_reaches_the_serving_metrics(tiny_model):
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model("olmoe")), kv_cache_tokens=512,
                                         expert_cache_fraction=0.5))

    async def one():
        return [o async for o in engine.generate([5, 6, 7], GREEDY)]
    try:
        outs = asyncio.run(one())
    finally:
        engine.shutdown()
    assert outs[-1].finished
    last = engine.engine.last_step_stats["expert_cache"]  # the step that finished the request
    assert last["hits"] + last["misses"] > 0
    snap, total = engine.metrics.snapshot(), engine.engine.model.experts.stats  # the whole run's
    assert snap["expert_cache_hit_rate"] == pytest.approx(last["hit_rate"])
    assert (snap["expert_cache/hit"], snap["expert_cache/miss"]) == (total.hits, total.misses)
    assert snap["expert_cache_bytes_moved"] == total.bytes_moved > 0


@pytest.mark.parametrize("kwargs, words", [
    ({"expert_cache_fraction": 0.0}, "expert_cache_fraction"),
    ({"expert_cache_fraction": 1.5}, "expert_cache_fraction"),
    ({"expert_cache_policy": "belady"}, "expert_cache_policy"),
    ({"expert_cache_schedule": "gpu"}, "expert_cache_schedule"),
])
def test_bad_cache_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(model="m", **kwargs)


def test_pregate_prefetch_keeps_tokens_and_cuts_demand_misses_on_the_trained_model():
    from cluster.demo import ensure_demo_model

    model = str(ensure_demo_model())
    prompts = ["def main():\n", "import os\n", "class A:\n", "for i in range(10):\n"]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLMEngine(EngineConfig(model=model)).generate(prompts, params)]
    stats = {}
    for prefetch in (False, True):
        engine = LLMEngine(EngineConfig(model=model, expert_cache_fraction=0.5, expert_cache_prefetch=prefetch))
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
        stats[prefetch] = engine.model.experts.stats.as_dict()
    assert stats[True]["prefetches"] > 0 and stats[True]["prefetch_accuracy"] > 0.25
    assert stats[True]["misses"] < 0.9 * stats[False]["misses"]


# ---- the intra-layer schedule and the slow tiers, live -------------------------------------------
CPU_ALWAYS = ExpertCostModel(expert_bytes=1, transfer_s=1.0, fast=LinearTime(1.0, 0.0), slow=LinearTime(0.0, 0.0),
                             overlap=False)  # computing in place costs nothing: no miss is ever loaded
LOAD_ALWAYS = ExpertCostModel(expert_bytes=1, transfer_s=0.0, fast=LinearTime(0.0, 0.0), slow=LinearTime(1.0, 1.0),
                              overlap=False)


def _cached_engine(model, cost: ExpertCostModel, tier: str | None = None) -> LLMEngine:
    """An engine whose CachedExperts plans with `cost` (and, for tier "host", moves from an unpinned HostTier)."""
    engine = LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=512, block_size=4))
    old = engine.model.experts
    spec, ckpt = engine.spec, Checkpoint(model)
    dtype = old.banks[spec.moe_layers[0]].buffer.dtype
    slow = HostTier(ckpt, spec, dtype, pin=False) if tier == "host" else None
    engine.model.experts = CachedExperts(ckpt, spec, dtype, torch.device("cpu"), old.ops,
                                         ExpertCacheConfig(0.25, cost_model=cost), tier=slow)
    return engine


def test_forced_schedules_load_every_miss_or_none(tiny_model):
    model = tiny_model("olmoe")
    want, _ = run(model, GREEDY)
    stats = {}
    for schedule in ("load", "cpu"):
        got, engine = run(model, GREEDY, expert_cache_fraction=0.5, expert_cache_schedule=schedule)
        assert got == want
        stats[schedule] = engine.model.experts.stats
    assert stats["cpu"].loads == stats["cpu"].hits == 0 and stats["cpu"].cpu_computed == stats["cpu"].misses
    load = stats["load"]
    assert load.loads > 0 and load.hits > 0 and load.loads + load.cpu_computed == load.misses
    assert load.cpu_computed < stats["cpu"].cpu_computed  # only what a layer's rows cannot take goes to the CPU


@pytest.mark.parametrize("cost, tier", [(CPU_ALWAYS, None), (LOAD_ALWAYS, "host"), (CPU_ALWAYS, "host")])
def test_each_schedule_and_tier_keeps_the_tokens(tiny_model, cost, tier):
    model = tiny_model("mixtral")
    want, _ = run(model, SAMPLED)
    engine = _cached_engine(model, cost, tier)
    assert [o.token_ids for o in engine.generate(PROMPTS, SAMPLED)] == want
    stats = engine.model.experts.stats
    if cost is CPU_ALWAYS:  # every miss computed where it lies; the fast tier stays empty
        assert stats.cpu_computed == stats.misses > 0 and stats.loads == stats.hits == stats.bytes_moved == 0
    else:  # every miss that has a row to go to is loaded
        assert stats.loads > 0 and stats.hits > 0 and stats.loads + stats.cpu_computed == stats.misses
        row_bytes = 3 * engine.spec.hidden_size * engine.spec.expert_intermediate * 4
        assert stats.bytes_moved == stats.loads * row_bytes


def test_calibration_measures_this_node(tiny_model):
    model = tiny_model("olmoe")
    spec, ckpt = load_spec(model), Checkpoint(model)
    cost = calibrate(CheckpointTier(ckpt, spec, torch.float32), spec, torch.float32, torch.device("cpu"),
                     LLMEngine(EngineConfig(model=str(model), kv_cache_tokens=64)).model.experts.ops,
                     token_counts=(1, 16), repeats=1)
    assert cost.expert_bytes == 3 * spec.hidden_size * spec.expert_intermediate * 4
    assert cost.transfer_s > 0 and cost.fast.at(1) > 0 and cost.slow.at(1) > 0 and not cost.overlap
    assert cost.slow_device == "cpu (checkpoint)" and "us/token" in cost.describe()


@pytest.mark.parametrize("schedule, tier", [("auto", None), ("load", "host"), ("cpu", None), ("cpu", "host")])
def test_a_shards_cache_returns_the_same_pair_outputs_as_its_resident_experts(tiny_model, schedule, tier):
    """An expert shard's cache (the Ray engine's path): pair outputs identical to the shard's own bank's."""
    from cluster.moe_dispatch import split_route
    from experts.loader import load_experts
    from experts.shard import ExpertShard
    from kernels.dispatch import select_kernels

    model = tiny_model("qwen2_moe")
    spec, ckpt, ops = load_spec(model), Checkpoint(model), select_kernels("cpu", "torch")
    owned = {layer: tuple(range(1, spec.num_experts, 2)) for layer in spec.moe_layers}  # odd experts
    shard = ExpertShard({layer: load_experts(ckpt, spec, layer, ids, torch.float32) for layer, ids in owned.items()},
                        ops)
    slow = HostTier(ckpt, spec, torch.float32, pin=False, owned=owned) if tier == "host" else None
    cache = CachedExperts(ckpt, spec, torch.float32, torch.device("cpu"), ops,
                          ExpertCacheConfig(0.5, schedule=schedule), tier=slow, owned=owned)
    gen = torch.Generator().manual_seed(0)
    owner = torch.tensor([e % 2 for e in range(spec.num_experts)])
    for step in range(6):
        x = torch.randn(5, spec.hidden_size, generator=gen)
        ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.top_k] for _ in range(5)])
        weights = torch.rand(5, spec.top_k, generator=gen)
        layer = spec.moe_layers[step % len(spec.moe_layers)]
        sl = list(split_route(ids, weights, owner, 2))[1]
        want = shard.pair_outputs(layer, x[sl.rows], sl.pair_row, sl.pair_expert)
        got = cache.pair_outputs(layer, x[sl.rows], sl.pair_row, sl.pair_expert, sl.pair_weight)
        assert torch.equal(got, want)
    stats = cache.stats
    assert stats.hits + stats.misses > 0 and (stats.cpu_computed == stats.misses if schedule == "cpu" else stats.loads > 0)
    with pytest.raises(ValueError, match="not on this shard"):
        cache.pair_outputs(spec.moe_layers[0], x, torch.tensor([0]), torch.tensor([0]))


LOADS_PAY = ExpertCostModel(expert_bytes=1, transfer_s=5.0, fast=LinearTime(0.0, 0.0), slow=LinearTime(1.0, 1.0),
                            overlap=False)  # a miss of t tokens costs min(5, 1 + t): a prefetch saves that


def test_prefetch_evicts_only_experts_the_prediction_does_not_expect(tiny_model):
    """A full layer holding one predicted and one unpredicted expert: a newly predicted expert takes
    the unpredicted one's row, whatever the policy would otherwise have chosen."""
    from kernels.dispatch import select_kernels

    model = tiny_model("olmoe")
    spec, ckpt = load_spec(model), Checkpoint(model)
    cache = CachedExperts(ckpt, spec, torch.float32, torch.device("cpu"), select_kernels("cpu", "torch"),
                          ExpertCacheConfig(2 / spec.num_experts, policy="lru", cost_model=LOADS_PAY, schedule="load"))
    layer = spec.moe_layers[0]
    lay = cache.layers[layer]
    assert len(lay.bank.buffer) == 2
    for e in (0, 1):  # expert 0 used first: LRU's victim would be 0
        cache.pair_outputs(layer, torch.randn(1, spec.hidden_size), torch.tensor([0]), torch.tensor([e]))
    assert set(lay.resident) == {0, 1}
    expected = [0.0] * spec.num_experts
    expected[0], expected[2] = 1.0, 3.0  # expert 0 is predicted again (after 2, which gains more); 1 is not
    moved = cache.stats.bytes_moved
    cache.prefetch(layer, expected)
    assert set(lay.resident) == {0, 2} and lay.prefetched == {2}  # 0 was never evicted and re-loaded
    assert cache.stats.bytes_moved - moved == lay.bank.buffer[0].numel() * 4

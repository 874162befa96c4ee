"""Automatic prefix caching: exact block matching, shared and evictable blocks, and an engine whose
outputs do not change when prompts share prefixes (greedy and seeded sampling, multi-turn)."""

from __future__ import annotations

import pytest

from cluster.block_manager import BlockManager
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.metrics import EngineMetrics
from cluster.prefix_cache import ROOT
from cluster.sampling_params import SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from cluster.sequence import Sequence


def _register(blocks: BlockManager, block_ids: list[int], tokens: list[int]) -> None:
    node = ROOT
    for i, block in enumerate(block_ids):
        node = blocks.register(block, node, tuple(tokens[4 * i:4 * i + 4]))


def test_cached_blocks_are_matched_exactly_shared_and_reused_least_recent_first():
    blocks = BlockManager(6, 4, prefix_caching=True)
    a = blocks.allocate_blocks(3)  # for 10 tokens
    _register(blocks, a[:2], list(range(8)))  # the first two are complete
    assert [b for b, _ in blocks.cached_prefix(list(range(12)))] == a[:2]
    assert [b for b, _ in blocks.cached_prefix(list(range(8)))] == a[:1]  # the last token's block is computed
    assert blocks.cached_prefix([0, 1, 2, 3, 9, 9, 9, 9, 9]) == blocks.cached_prefix([0, 1, 2, 3, 0])
    assert blocks.cached_prefix([4, 5, 6, 7, 0, 1, 2, 3, 0]) == []  # a block is keyed by what comes before it
    blocks.free(a)  # the cached two stay readable, counted as free; the third is free
    assert blocks.num_free == 6 and blocks.num_evictable(a) == 2
    shared = [b for b, _ in blocks.cached_prefix(list(range(9)))]
    blocks.acquire(shared)
    assert blocks.num_free == 4 and blocks.num_evictable(shared) == 0
    blocks.acquire(shared[:1])  # a second sequence on the first block
    blocks.free(shared)
    assert blocks.num_free == 5 and blocks.cached_prefix(list(range(9)))  # block 2 evictable again, 1 still held
    blocks.allocate_blocks(4)  # the 4 free blocks first: the cache keeps a[1]
    assert [b for b, _ in blocks.cached_prefix(list(range(9)))] == a[:2] and blocks.num_free == 1
    blocks.allocate_blocks(1)  # now the cache gives a[1] up
    assert [b for b, _ in blocks.cached_prefix(list(range(9)))] == a[:1] and blocks.num_free == 0
    blocks.free(shared[:1])
    with pytest.raises(RuntimeError, match="freed twice"):
        blocks.free(shared[:1])
    blocks.clear_cache()
    assert blocks.cached_prefix(list(range(9))) == [] and blocks.num_free == 1 and blocks.prefix.entries == {}


def test_the_same_content_registered_twice_keeps_one_cached_block():
    blocks = BlockManager(4, 4, prefix_caching=True)
    a, b = blocks.allocate_blocks(1), blocks.allocate_blocks(1)
    assert blocks.register(a[0], ROOT, (1, 2, 3, 4)) == blocks.register(b[0], ROOT, (1, 2, 3, 4))
    blocks.free(b)  # b's copy was never cached: free at once
    assert blocks.num_free == 3 and blocks.num_evictable(b) == 0


def test_a_sequence_continues_right_behind_its_cached_prefix_when_those_blocks_are_free():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=16,
                                  max_model_len=64, prefix_caching=True))
    prefix = list(range(1, 9))  # two full blocks
    s.add(Sequence(0, [50, 51, 52, 53, 54], max_tokens=3))  # blocks 0-1
    s.add(Sequence(1, prefix + [60], max_tokens=3))  # blocks 2-4, the prefix in 2-3
    s.update(s.schedule(), {0: 7, 1: 7})
    assert s.seqs[1].block_ids == [2, 3, 4]
    s.finish(0, "stop")
    s.finish(1, "stop")  # 0-1 and 4 free, 2-3 cached
    s.add(Sequence(2, prefix + [70, 71], max_tokens=3))
    s.schedule()
    assert s.seqs[2].block_ids == [2, 3, 4]  # not 0-1, the lowest free run: its keys stay consecutive


def test_the_scheduler_starts_a_sequence_after_its_cached_blocks():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=16,
                                  max_model_len=64, prefix_caching=True))
    prefix = list(range(1, 11))  # 10 tokens: two full blocks
    s.add(Sequence(0, prefix + [50], max_tokens=3))
    out = s.schedule()
    s.update(out, {0: 7})
    s.add(Sequence(1, prefix + [60, 61], max_tokens=3))
    (chunk,) = [c for c in s.schedule().chunks if c.seq_id == 1]
    assert chunk.start == 8 and chunk.token_ids == (9, 10, 60, 61)
    assert list(chunk.block_ids[:2]) == s.seqs[0].block_ids[:2]  # shared
    assert (s.prefix_hit_tokens, s.prefix_query_tokens) == (8, 11 + 12)
    plain = Scheduler(SchedulerConfig(block_size=4, num_blocks=16, max_model_len=64))
    plain.add(Sequence(0, prefix + [50], max_tokens=3))
    plain.update(plain.schedule(), {0: 7})
    plain.add(Sequence(1, prefix + [60, 61], max_tokens=3))
    assert [c.start for c in plain.schedule().chunks if c.seq_id == 1] == [0]


def test_with_two_attention_workers_a_sequence_reuses_only_blocks_of_the_worker_it_starts_on():
    """Sequences 0 and 2 start on worker 0, 1 and 3 on worker 1 (seq_id mod 2): each worker computes
    the shared prefix once, and each sequence shares the blocks its own worker holds."""
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_blocks=32,
                                  max_model_len=64, prefix_caching=True, attention_workers=2))
    prefix = list(range(1, 11))  # two full blocks
    for i in range(2):
        s.add(Sequence(i, prefix + [50 + i], max_tokens=3))
    s.update(s.schedule(), {0: 7, 1: 7})
    assert s.prefix_hit_tokens == 0 and s.seqs[0].block_ids[:2] != s.seqs[1].block_ids[:2]
    for i in range(2, 4):
        s.add(Sequence(i, prefix + [60 + i], max_tokens=3))
    chunks = {c.seq_id: c for c in s.schedule().chunks}
    assert chunks[2].start == chunks[3].start == 8 and s.prefix_hit_tokens == 16
    assert list(chunks[2].block_ids[:2]) == s.seqs[0].block_ids[:2]
    assert list(chunks[3].block_ids[:2]) == s.seqs[1].block_ids[:2]


def test_a_sequence_moved_to_another_worker_registers_no_more_blocks():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_blocks=32,
                                  max_model_len=64, prefix_caching=True, attention_workers=2))
    prompt = list(range(1, 10))  # two full blocks, registered by the first step
    s.add(Sequence(0, prompt, max_tokens=8))
    s.update(s.schedule(), {0: 7})
    s.stop_caching(0)  # request shuffling moved it: what it computes now lies on the other worker
    for _ in range(6):  # its third and fourth blocks fill, and are not registered
        s.update(s.schedule(), {0: 7})
    assert len(s.blocks.prefix.entries) == 2
    s.add(Sequence(2, prompt + [7] * 7 + [1], max_tokens=3))  # starts on worker 0 too
    (chunk,) = [c for c in s.schedule().chunks if c.seq_id == 2]
    assert chunk.start == 8  # the two blocks cached before the move, not the ones after


PREFIX = [(i * 37) % 200 + 3 for i in range(45)]  # a "system prompt" of 45 tokens


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_outputs_do_not_change_when_prompts_share_prefixes(tiny_model, family):
    path = str(tiny_model(family))
    cached = LLMEngine(EngineConfig(model=path, kv_cache_tokens=1024, block_size=8, enable_prefix_caching=True))
    plain = LLMEngine(EngineConfig(model=path, kv_cache_tokens=1024, block_size=8))
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    first = [PREFIX + [7, 8, 9]]
    later = [PREFIX + [7, 8, 9], PREFIX + [100, 101], PREFIX[:20] + [5]]
    for params in (greedy, sampled):
        want = [o.token_ids for o in plain.generate(first + later, params)]
        got = [o.token_ids for o in cached.generate(first, params)]
        got += [o.token_ids for o in cached.generate(later, params)]
        assert got == want
    assert cached.scheduler.prefix_hit_tokens >= 2 * (40 + 40 + 16)  # every later prompt reused its blocks
    # multi-turn: the next prompt is the last prompt and its answer: the answer's blocks are cached too
    turn = PREFIX + [7, 8, 9] + list(want[0])
    hits = cached.scheduler.prefix_hit_tokens
    assert cached.generate([turn], greedy)[0].token_ids == plain.generate([turn], greedy)[0].token_ids
    assert cached.scheduler.prefix_hit_tokens - hits == 56  # 60 tokens: all 7 full blocks but the last token's


def test_a_full_cache_gives_its_blocks_up_and_requests_still_complete(tiny_model):
    path = str(tiny_model("olmoe"))
    engine = LLMEngine(EngineConfig(model=path, kv_cache_tokens=96, block_size=8, enable_prefix_caching=True))
    reference = LLMEngine(EngineConfig(model=path, kv_cache_tokens=96, block_size=8))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[i + 3] * 30 + [9] for i in range(5)]  # 5 different prompts of 5 blocks each, 12 blocks in all
    assert [o.token_ids for o in engine.generate(prompts, params)] == \
        [o.token_ids for o in reference.generate(prompts, params)]
    blocks = engine.scheduler.blocks
    assert blocks.num_free == 12 and len(blocks.prefix.evictable) > 0  # cached, but free to take


def test_prefix_cache_and_preemption_metrics_count_what_is_new():
    metrics = EngineMetrics("m")
    metrics.on_step({"prefix_cache_queries": 10, "prefix_cache_hits": 4, "num_preemptions": 1})
    metrics.on_step({"prefix_cache_queries": 25, "prefix_cache_hits": 4, "num_preemptions": 3})
    assert (metrics.totals["prefix_cache_queries"], metrics.totals["prefix_cache_hits"]) == (25, 4)
    assert metrics.totals["num_preemptions"] == 3


def test_requests_admitted_in_one_step_share_the_prefix_the_first_computes(tiny_model):
    """In-process, one forward pass writes each layer's K/V before attending, so the second and third
    requests of a burst read the prefix blocks the first writes in the same step."""
    path = str(tiny_model("olmoe"))
    cached = LLMEngine(EngineConfig(model=path, kv_cache_tokens=1024, block_size=8, enable_prefix_caching=True))
    plain = LLMEngine(EngineConfig(model=path, kv_cache_tokens=1024, block_size=8))
    burst = [PREFIX + [7], PREFIX + [8, 9], PREFIX + [10]]
    for params in (SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=10, temperature=0.8, seed=4, ignore_eos=True)):
        hits = cached.scheduler.prefix_hit_tokens
        assert [o.token_ids for o in cached.generate(burst, params)] == \
            [o.token_ids for o in plain.generate(burst, params)]
        assert cached.scheduler.prefix_hit_tokens - hits >= 2 * 40  # the 5 full prefix blocks, twice


def test_a_failed_step_empties_the_prefix_cache(tiny_model, monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), kv_cache_tokens=1024, block_size=8,
                                    enable_prefix_caching=True))
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = engine.generate([PREFIX + [7]], greedy)[0].token_ids
    assert engine.scheduler.blocks.prefix.entries
    monkeypatch.setattr(engine.model, "execute", lambda out: (_ for _ in ()).throw(RuntimeError("boom")))
    assert engine.generate([PREFIX + [8]], greedy)[0].finish_reason == "error"
    assert engine.scheduler.blocks.prefix.entries == {}  # what that step registered was never written
    monkeypatch.undo()
    assert engine.generate([PREFIX + [7]], greedy)[0].token_ids == want

"""Speculative decoding by prompt lookup: drafts, verification, and an output that does not change."""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from cluster.sequence import Sequence
from cluster.speculative import (ACCEPT_DECAY, MAX_PAUSE, NgramIndex, SpeculativeConfig, accept, draft_limit,
                                 next_acceptance, next_pause, propose, row_outputs)

CODE = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "import os\nimport sys\n\n",
        "class Foo:\n    def __init__(self, x):\n        self.x = x\n"]


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_suffix():
    assert propose([1, 2, 3, 9, 1, 2, 3], 3, 4, 2) == (9, 1, 2)  # [1, 2, 3] occurred at 0
    assert propose([5, 6, 7, 5, 6, 8, 5, 6], 2, 4, 2) == (8, 5)  # the latest [5, 6], not the first
    assert propose([4, 1, 2, 7, 1, 2, 9, 4, 1, 2], 1, 3, 2) == (7,)  # [4, 1, 2] beats the later [1, 2]
    assert propose([1, 2, 3, 4], 3, 4, 1) == ()  # nothing repeats
    assert propose([1, 2, 3, 1], 3, 4, 2) == ()  # only a 1-gram repeats, below min_n
    assert propose([1, 2, 1], 5, 2, 1) == (2, 1)  # fewer than k follow
    assert propose([1, 2, 1, 2], 0, 2, 1) == ()


def test_the_incremental_index_proposes_what_the_lookup_proposes():
    """NgramIndex, grown a few tokens at a time, against `propose` over the whole context."""
    import random
    rng = random.Random(0)
    for _ in range(200):
        max_n = rng.randint(1, 5)
        min_n, k = rng.randint(1, max_n), rng.randint(0, 5)
        tokens = [rng.randrange(rng.choice([2, 3, 5, 50])) for _ in range(rng.randint(0, 80))]
        index, seen = NgramIndex(max_n, min_n), 0
        while seen < len(tokens):
            step = rng.randint(1, 6)
            index.extend(tokens[seen:seen + step])
            seen = min(seen + step, len(tokens))
            assert index.propose(k) == propose(tokens[:seen], k, max_n, min_n)


def test_verification_keeps_drafts_up_to_the_first_mismatch_then_the_models_token():
    assert accept((4, 5, 6), (4, 5, 9, 7)) == [4, 5, 9]
    assert accept((4, 5, 6), (4, 5, 6, 8)) == [4, 5, 6, 8]  # all kept, plus the token after the last
    assert accept((1,), (2, 3)) == [2]
    assert accept((), (3,)) == [3]


def test_row_outputs_and_settings():
    assert row_outputs([4, 4, 4, 7], [[1], [1], [1], [2]], {4: (8, 9)}) == [[1], [1, 8], [1, 8, 9], [2]]
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        SpeculativeConfig(2, prompt_lookup_max=2, prompt_lookup_min=3)
    with pytest.raises(ValueError, match="num_speculative_tokens cannot be combined with record_trace"):
        EngineConfig(model="m", num_speculative_tokens=2, record_trace="t.jsonl")


def test_the_scheduler_drafts_within_max_tokens_and_counts_kept_drafts_as_computed():
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=16, max_model_len=64,
                                  speculative=SpeculativeConfig(4, 4, 2)))
    s.add(Sequence(0, [1, 2, 3, 1, 2], 3, speculate=True))
    s.add(Sequence(1, [1, 2, 3, 1, 2], 8))  # not allowed to speculate
    s.update(s.schedule(), {0: 3, 1: 3})  # both: 1 2 3 1 2 | 3
    out = s.schedule()
    chunks = {c.seq_id: c for c in out.chunks}
    assert (chunks[0].token_ids, chunks[0].num_draft) == ((3, 1), 1)  # [1, 2, 3] -> 1 2 3; max_tokens allows 1
    assert (chunks[1].token_ids, chunks[1].num_draft) == ((3,), 0)
    s.update(out, {0: 7, 1: 7}, {0: (1,)})  # the draft 1 kept, then 7
    assert s.seqs[0].output_ids == [3, 1, 7] and s.seqs[0].num_computed == 7 and s.seqs[0].num_pending == 1
    assert s.seqs[1].output_ids == [3, 7] and s.seqs[1].num_computed == 6


def test_missed_drafts_pause_drafting_for_longer_each_time_until_one_is_kept():
    assert next_pause((0, 0), 0, 0) == (0, 0)  # no drafts: nothing learned
    pause, lengths = (0, 0), []
    for _ in range(7):
        pause = next_pause(pause, 4, 0)
        lengths.append(pause[0])
    assert lengths == [1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE]
    assert next_pause(pause, 4, 1) == (0, 0)
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=16, max_model_len=64,
                                  speculative=SpeculativeConfig(2, 4, 2)))
    s.add(Sequence(0, [1, 2, 3, 1, 2], 40, speculate=True))
    cycle = iter([3, 1, 2] * 20)  # the output continues the pattern: a draft is always proposed

    def step(keep: bool) -> int:
        out = s.schedule()
        drafted = out.chunks[0].num_draft
        kept = tuple(next(cycle) for _ in range(drafted)) if keep else ()
        s.update(out, {0: next(cycle)}, {0: kept})
        return drafted

    step(False)  # the prefill
    # missed: pauses of 1, 2, 4 steps, and one draft at a time once none has been kept (draft_limit)
    assert [step(False) for _ in range(8)] == [2, 0, 1, 0, 0, 1, 0, 0]
    # the pause runs out; kept: no more pausing, and more drafts as the estimated keep rate climbs
    assert [step(True) for _ in range(6)] == [0, 0, 1, 1, 1, 2]


def test_the_keep_rate_sets_how_many_drafts_a_step_proposes():
    assert next_acceptance((1.0, 2.0), 0, 0) == (1.0, 2.0)  # no drafts: nothing learned
    assert next_acceptance((0.0, 0.0), 4, 4) == (4.0, 0.0)  # all kept: no miss seen
    assert next_acceptance((0.0, 0.0), 4, 1) == (1.0, 1.0)  # kept up to the first miss
    assert next_acceptance((5.0, 5.0), 2, 0) == pytest.approx((5 * ACCEPT_DECAY, 5 * ACCEPT_DECAY + 1))
    assert draft_limit((0.0, 0.0), 4, 0.3) == 4  # nothing judged yet: all of them
    assert draft_limit((9.0, 1.0), 4, 0.3) == 4  # 0.9^4 = 0.66
    assert draft_limit((6.0, 4.0), 4, 0.3) == 2  # 0.6, 0.36, then 0.22 < 0.3
    assert draft_limit((5.0, 5.0), 4, 0.3) == 1  # 0.5, then 0.25
    assert draft_limit((0.0, 3.0), 4, 0.3) == 0  # never kept: none (the scheduler pauses, then tries one)
    assert draft_limit((6.0, 4.0), 4, 0.0) == 4  # min_keep_chance 0: always all of them
    assert draft_limit((6.0, 4.0), 0, 0.3) == 0
    with pytest.raises(ValueError, match="min_keep_chance"):
        SpeculativeConfig(2, min_keep_chance=1.0)
    # in the scheduler: a sequence whose drafts are seldom kept pauses instead, and tries one at the end
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=16, max_model_len=64,
                                  speculative=SpeculativeConfig(3, 4, 2)))
    seq = Sequence(0, [1, 2, 3, 1, 2], 40, speculate=True)
    s.add(seq)
    s.update(s.schedule(), {0: 3})  # the prefill
    seq.draft_counts = (1.0, 9.0)  # kept 1 in 10
    drafted = []
    for token in [1, 2, 3, 1]:
        out = s.schedule()
        drafted.append(out.chunks[0].num_draft)
        s.update(out, {0: token}, {0: ()})
    assert drafted == [0, 0, 1, 0]  # paused (1 step), then one draft, missed: a pause of 2


@pytest.fixture(scope="module")
def demo():
    return str(ensure_demo_model())


def _run(model: str, params: SamplingParams, k: int, prompts=CODE) -> tuple[list, LLMEngine]:
    engine = LLMEngine(EngineConfig(model=model, num_speculative_tokens=k))
    return engine.generate(prompts, params), engine


def test_greedy_output_is_the_same_with_speculation_and_drafts_are_kept(demo):
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    want, _ = _run(demo, params, 0)
    for prompts in (CODE[:1], CODE):  # alone, and in a batch
        got, engine = _run(demo, params, 4, prompts)
        assert [o.token_ids for o in got] == [o.token_ids for o in want[:len(prompts)]]
        assert [o.text for o in got] == [o.text for o in want[:len(prompts)]]
        assert engine.num_accepted_tokens > 0 and engine.num_draft_tokens >= engine.num_accepted_tokens


def _drafted_first(model: str, prompt: str, params: SamplingParams) -> list[int]:
    """Tokens whose first occurrence in the output was a kept draft (not the token a step added)."""
    engine = LLMEngine(EngineConfig(model=model, num_speculative_tokens=4))
    steps, verify = [], engine._verify
    engine._verify = lambda *a: steps.append(verify(*a)) or steps[-1]
    engine.generate([prompt], params)
    seen, drafted = set(), []
    for sampled, accepted in steps:
        for sid, token in sampled.items():
            for t, kept in [(t, True) for t in accepted[sid]] + [(token, False)]:
                if t not in seen and kept:
                    drafted.append(t)
                seen.add(t)
    return drafted


def test_stop_tokens_and_max_tokens_end_a_request_where_they_would_without_drafts(demo):
    prompt = CODE[2]  # its output meets some tokens first as kept drafts
    stops = _drafted_first(demo, prompt, SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True))
    assert stops  # the request ends inside a step's kept drafts: the tokens after the stop are dropped
    for params in [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (5, 13, 30)] + \
                  [SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True, stop_token_ids=(t,))
                   for t in stops[:4]]:
        [want], _ = _run(demo, params, 0, [prompt])
        [got], _ = _run(demo, params, 4, [prompt])
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)


def test_penalties_min_tokens_and_logprobs_see_the_drafts_before_each_row(demo):
    """A penalty at a draft's row counts the drafts before it; logprobs are kept for kept tokens only."""
    [ref], _ = _run(demo, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True), 0, CODE[2:])
    for params in (SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=2),
                   SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, repetition_penalty=1.05),
                   SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, frequency_penalty=0.1,
                                  presence_penalty=0.1),
                   SamplingParams(max_tokens=64, temperature=0.0, min_tokens=40, stop_token_ids=ref.token_ids[20:22])):
        [want], _ = _run(demo, params, 0, CODE[2:])
        [got], engine = _run(demo, params, 4, CODE[2:])
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
        assert engine.num_draft_tokens > 0
        if params.logprobs is not None:
            assert len(got.logprobs) == len(got.token_ids)
            assert [lp.token_id for lp in got.logprobs] == list(got.token_ids)
            assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
            assert [[t for t, _ in lp.top] for lp in got.logprobs] == [[t for t, _ in lp.top] for lp in want.logprobs]


def test_stop_strings_end_a_request_at_the_token_that_completes_them(demo):
    """Stop strings taken from the greedy text at several places: with drafts, the request ends at
    the same token, with the same text, as decoding one token per step (and min_tokens holds)."""
    [ref], _ = _run(demo, SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True), 0, CODE[2:])
    stops = [ref.text[i:i + 4] for i in range(20, len(ref.text) - 4, 9)][:8]
    for stop, min_tokens in [(s, 0) for s in stops] + [(stops[0], 30)]:
        params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True, stop=(stop,), min_tokens=min_tokens)
        [want], _ = _run(demo, params, 0, CODE[2:])
        [got], engine = _run(demo, params, 4, CODE[2:])
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), stop
        assert engine.num_draft_tokens > 0
        streamed = list(engine.stream(CODE[2], params))  # the text released while checking comes out too
        assert "".join(u.new_text for u in streamed) == want.text and streamed[-1].token_ids == want.token_ids


@pytest.mark.parametrize("kw", [{"temperature": 0.8}, {"temperature": 1.0, "top_k": 5},
                                {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}])
def test_seeded_sampled_requests_speculate_and_keep_their_tokens(demo, kw):
    """Each output position draws with its own uniform, so a kept draft is the token decoding without
    drafts would have drawn there: the same tokens alone, in a batch, with and without drafts."""
    params = SamplingParams(max_tokens=64, seed=5, ignore_eos=True, **kw)
    want, _ = _run(demo, params, 0)
    for prompts in (CODE[:1], CODE):
        got, engine = _run(demo, params, 4, prompts)
        assert [o.token_ids for o in got] == [o.token_ids for o in want[:len(prompts)]]
        assert engine.num_draft_tokens > 0
        # drafts are repeats, which a repetition penalty makes unlikely: none may be kept then
        assert engine.num_accepted_tokens > 0 or "repetition_penalty" in kw


def test_a_sampled_draft_is_kept_with_the_models_probability_of_it():
    """Rejection sampling against a one-token proposal, as the engine verifies: draw at the position,
    keep the draft when the draw equals it. The kept tokens follow the model's distribution, and a
    draft is kept as often as the model would pick it."""
    import torch

    from cluster.sampler import TokenRandom, sample

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    probs = torch.softmax(logits, dim=-1)[0]
    params = [SamplingParams(temperature=1.0)]
    out, kept = [], 0
    for seed in range(4000):
        token = sample(logits, params, [TokenRandom(seed)], [0])[0]
        new = accept((1,), (token, 4))  # draft token 1; 4: the token after it, if kept
        kept += len(new) == 2
        out.append(new[0])
    assert abs(kept / 4000 - float(probs[1])) < 0.03
    counts = torch.bincount(torch.tensor(out), minlength=5).float() / 4000
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)


def test_streams_and_metrics_count_every_token_and_the_drafts(demo):
    import asyncio

    from cluster.async_engine import AsyncLLMEngine

    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    engine = AsyncLLMEngine(EngineConfig(model=demo, num_speculative_tokens=4), model_name="demo")

    async def stream():
        return [o async for o in engine.generate(CODE[2], params)]
    try:
        updates = asyncio.run(asyncio.wait_for(stream(), 60))
    finally:
        engine.shutdown()
    [want], _ = _run(demo, params, 0, CODE[2:])
    assert [t for u in updates for t in u.new_token_ids] == list(want.token_ids) == list(updates[-1].token_ids)
    assert max(len(u.new_token_ids) for u in updates) > 1  # a step gave several tokens
    snap = engine.metrics.snapshot()
    assert snap["generation_tokens"] == 48
    assert snap["spec_decode_draft_tokens"] == engine.engine.num_draft_tokens > 0
    assert snap["spec_decode_accepted_tokens"] == engine.engine.num_accepted_tokens > 0


def test_an_admission_never_takes_the_blocks_of_the_steps_drafts():
    """A's reserved tail holds the slots of its drafts; B, admitted with only its prompt's blocks,
    may take A's tail blocks, but not those (here it then waits: the rest of the tail is too short)."""
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=8, max_model_len=64,
                                  speculative=SpeculativeConfig(4, 4, 2)))
    s.add(Sequence(0, [1, 2, 3, 4, 1, 2, 3, 4], 16, speculate=True))  # 6 blocks reserved, 2 free
    s.update(s.schedule(), {0: 1})
    s.add(Sequence(1, list(range(20, 36)), 8))  # 16 prompt tokens: 4 blocks, 3 of them from A's tail
    chunks = {c.seq_id: c for c in s.schedule().chunks}
    a = chunks[0]
    assert a.token_ids == (1, 2, 3, 4, 1) and a.num_draft == 4  # positions 8-12: blocks 2 and 3 of A
    assert not set(a.block_ids[:4]) & set(s.seqs[1].block_ids)


def test_drafts_with_prefix_caching_and_preemption_keep_the_tokens(demo):
    """Shared prompt blocks registered in the step that computes them, drafts beside them, and a KV
    cache too small for every request at once (sequences grow, are preempted and recomputed)."""
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    prompts = [CODE[2] + tail for tail in ("", "    def a(self):\n", "    def b(self):\n", "    x = 1\n")]
    want = LLMEngine(EngineConfig(model=demo)).generate(prompts, params)
    for extra in ({"enable_prefix_caching": True, "block_size": 4}, {"kv_cache_tokens": 160, "block_size": 8}):
        engine = LLMEngine(EngineConfig(model=demo, num_speculative_tokens=4, **extra))
        got = engine.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], extra
        assert engine.num_accepted_tokens > 0
        assert engine.scheduler.prefix_hit_tokens > 0 if "enable_prefix_caching" in extra else \
            engine.scheduler.num_preemptions > 0

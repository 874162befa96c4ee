"""AsyncLLMEngine (no Ray): streams, validation before output, overload, aborts, shutdown; engine metrics."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing

import pytest

from cluster.async_engine import AsyncLLMEngine, EngineOverloaded, EngineStopped
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.metrics import EngineMetrics, load_imbalance
from cluster.sampling_params import SamplingParams
from cluster.scheduler import AdmissionError

MAX_MODEL_LEN = 256
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=MAX_MODEL_LEN - 8, temperature=0.0, ignore_eos=True)


def config(model_dir, **overrides) -> EngineConfig:
    args = dict(model=str(model_dir), max_model_len=MAX_MODEL_LEN, kv_cache_tokens=1024, block_size=8)
    return EngineConfig(**{**args, **overrides})


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = AsyncLLMEngine(config(tiny_model("olmoe")), model_name="tiny")
    yield engine
    engine.shutdown()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(engine, prompt, params):
    return [o async for o in engine.generate(prompt, params)]


async def settled(engine, timeout: float = 10.0) -> dict:
    """The engine's stats once it holds no request (fails the test on timeout)."""
    async def idle():
        while True:
            s = engine.stats()
            if s["num_requests"] == s["running"] == s["waiting"] == 0:
                return s
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(idle(), timeout)


def test_stream_matches_the_synchronous_engine(engine, tiny_model):
    outs = run(collect(engine, "hello", GREEDY))
    reference = LLMEngine(config(tiny_model("olmoe"))).generate(["hello"], GREEDY)[0]
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert sum((o.new_token_ids for o in outs), ()) == outs[-1].token_ids == reference.token_ids
    assert "".join(o.new_text for o in outs) == outs[-1].text == reference.text
    assert engine.model_name == "tiny" and engine.max_model_len == MAX_MODEL_LEN


def test_concurrent_requests_batch_and_all_finish(engine):
    async def many():
        return await asyncio.gather(*(collect(engine, [3 + i, 4, 5], GREEDY) for i in range(6)))
    results = run(many())
    assert [r[-1].finish_reason for r in results] == ["length"] * 6
    alone = run(collect(engine, [3 + 2, 4, 5], GREEDY))
    assert results[2][-1].token_ids == alone[-1].token_ids  # batching does not change greedy output


@pytest.mark.parametrize("prompt, params, error, words", [
    ([1, 10**6], GREEDY, ValueError, "out of range"),
    ([], GREEDY, AdmissionError, "empty"),
    ("x" * 300, GREEDY, AdmissionError, "max_model_len"),
])
def test_bad_requests_raise_before_any_output(engine, prompt, params, error, words):
    async def first():
        async for out in engine.generate(prompt, params):
            return out
    with pytest.raises(error, match=words):
        run(first())
    assert run(collect(engine, "ok", GREEDY))[-1].finish_reason == "length"


def test_break_and_cancel_abort_the_request(engine):
    before = engine.stats()["metrics"].get("finished/abort", 0)

    async def leave_early():
        async with aclosing(engine.generate("hi", LONG)) as outs:
            async for out in outs:
                assert not out.finished
                break
        task = asyncio.create_task(collect(engine, "hi", LONG))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await settled(engine)
    stats = run(leave_early())
    assert stats["metrics"]["finished/abort"] == before + 2 and stats["kv_cache_usage"] == 0.0


def test_waiting_requests_are_bounded_and_a_cancelled_waiter_leaves(tiny_model):
    # "a" must hold the only slot for the whole scenario: thousands of tokens, aborted at the end.
    model = tiny_model("olmoe", max_position_embeddings=8192)
    engine = AsyncLLMEngine(config(model, max_num_seqs=1, max_model_len=8192, kv_cache_tokens=8192),
                            max_waiting=1)
    hold = SamplingParams(max_tokens=8000, temperature=0.0, ignore_eos=True)

    async def scenario():
        running = engine.generate("a", hold)
        assert not (await anext(running)).finished  # holds the only sequence slot
        waiter = asyncio.create_task(collect(engine, "b", GREEDY))
        while engine.stats()["waiting"] == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloaded):
            await collect(engine, "c", GREEDY)
        waiter.cancel()
        await running.aclose()
        return await settled(engine)
    try:
        stats = run(scenario())
    finally:
        engine.shutdown()
    assert stats["metrics"]["finished/abort"] == 2 and "finished/length" not in stats["metrics"]


def test_shutdown_ends_live_streams_and_refuses_new_ones(tiny_model):
    engine = AsyncLLMEngine(config(tiny_model("olmoe")))

    async def scenario():
        outs = engine.generate("a", LONG)
        await anext(outs)
        await asyncio.to_thread(engine.shutdown)
        rest = [o async for o in outs]
        with pytest.raises(EngineStopped):
            await collect(engine, "b", GREEDY)
        return rest
    rest = run(scenario())
    assert rest[-1].finished and rest[-1].finish_reason == "abort" and not engine.ready


def test_metrics_count_tokens_of_finished_requests(tiny_model):
    engine = AsyncLLMEngine(config(tiny_model("olmoe")), model_name="m")
    try:
        outs = run(collect(engine, "hello", GREEDY))

        async def both():
            return await asyncio.gather(collect(engine, [7, 8, 9], GREEDY), collect(engine, [5], GREEDY))
        finals = run(both())
    finally:
        engine.shutdown()
    snap = engine.metrics.snapshot()
    prompts = outs[-1].num_prompt_tokens + 3 + 1
    assert snap["prompt_tokens"] == prompts and snap["first_tokens"] == 3
    assert snap["generation_tokens"] == 3 * GREEDY.max_tokens and snap["finished/length"] == 3
    assert snap["running"] == snap["waiting"] == 0 and all(f[-1].finished for f in finals)
    # Every token the model ran (prompt + all sampled but the last) went to top_k experts per MoE layer.
    spec, ran = engine.spec, prompts + 3 * (GREEDY.max_tokens - 1)
    for layer in spec.moe_layers:
        routed = sum(snap.get(f"expert_tokens/{layer}/{e}", 0) for e in range(spec.num_experts))
        assert routed == ran * spec.top_k
    assert snap["expert_load_imbalance"] >= 1.0


def test_moe_step_stats_feed_expert_metrics():
    metrics = EngineMetrics("m")
    counts = [[4, 0, 2, 2], [1, 1, 1, 1]]  # [L][E] tokens of one step
    stats = {"running": 2, "waiting": 1, "kv_cache_usage": 0.25,
             "moe": {"expert_tokens": counts, "cross_node_bytes": {"send": 100, "recv": 40, "migrate": 7},
                     "route_prediction_recall": {1: 0.9, 2: 0.5}, "expert_cache_hit_rate": 0.75,
                     "sequences_moved": 3}}
    metrics.on_step(stats)
    metrics.on_step(stats)
    snap = metrics.snapshot()
    assert snap["expert_tokens/0/0"] == 8 and "expert_tokens/0/1" not in snap and snap["expert_tokens/1/3"] == 2
    assert snap["expert_load_imbalance"] == pytest.approx((4 / 2 + 1 / 1) / 2)
    assert (snap["cross_node_bytes/send"], snap["cross_node_bytes/recv"]) == (200, 80)
    assert (snap["cross_node_bytes/migrate"], snap["sequences_moved"]) == (14, 6)
    assert snap["route_prediction_recall/2"] == 0.5 and snap["expert_cache_hit_rate"] == 0.75
    assert (snap["running"], snap["waiting"], snap["kv_cache_usage"]) == (2, 1, 0.25)


def test_expert_cache_stats_feed_counters_and_prefetch_accuracy():
    metrics = EngineMetrics("m")
    metrics.on_step({"running": 1, "moe": {"expert_cache": {"hits": 3, "misses": 1, "bytes_moved": 4096,
                                                             "prefetches": 0, "prefetch_used": 0}}})
    assert "expert_cache_prefetch_accuracy" not in metrics.snapshot()  # nothing loaded ahead yet
    for used in (1, 2):  # 4 loaded ahead in all, 3 of them used: accuracy over the whole run
        metrics.on_step({"running": 1, "moe": {"expert_cache": {"hits": 2, "misses": 2, "bytes_moved": 1024,
                                                                 "prefetches": 2, "prefetch_used": used}}})
    snap = metrics.snapshot()
    assert (snap["expert_cache/hit"], snap["expert_cache/miss"], snap["expert_cache_bytes_moved"]) == (7, 5, 6144)
    assert (snap["expert_cache/prefetch"], snap["expert_cache/prefetch_used"]) == (4, 3)
    assert snap["expert_cache_prefetch_accuracy"] == pytest.approx(0.75)


def test_load_imbalance_ignores_empty_layers():
    assert load_imbalance([[0, 0], [3, 1]]) == pytest.approx(1.5)
    assert load_imbalance([[0, 0]]) is None


def test_a_slow_consumer_gets_joined_deltas_that_add_up(engine):
    async def slow():
        outs = []
        async for out in engine.generate("hello", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                                 logprobs=1)):
            outs.append(out)
            await asyncio.sleep(0.02)  # the engine runs ahead meanwhile
        return outs
    outs = run(slow())
    assert len(outs) < 24 and any(len(o.new_token_ids) > 1 for o in outs)
    assert sum((o.new_token_ids for o in outs), ()) == outs[-1].token_ids and len(outs[-1].token_ids) == 24
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert sum((o.new_logprobs for o in outs), ()) == outs[-1].logprobs


def test_stream_interval_paces_a_fast_engine(tiny_model):
    engine = AsyncLLMEngine(config(tiny_model("olmoe")), stream_interval_s=0.05)

    async def timed():
        loop, stamps, outs = asyncio.get_running_loop(), [], []
        async for out in engine.generate("hello", SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)):
            stamps.append(loop.time())
            outs.append(out)
        return stamps, outs
    try:
        stamps, outs = run(timed())
    finally:
        engine.shutdown()
    assert sum((o.new_token_ids for o in outs), ()) == outs[-1].token_ids and len(outs[-1].token_ids) == 64
    gaps = [b - a for a, b in zip(stamps[1:-1], stamps[2:-1])]  # between paced outputs (not the first/last)
    assert all(g >= 0.045 for g in gaps) and len(outs) < 64


def test_expert_token_counters_reach_ray_in_batches(monkeypatch):
    from cluster import metrics as metrics_module

    metrics = EngineMetrics("m")
    calls = []
    monkeypatch.setattr(metrics.expert_tokens, "inc", lambda value, tags=None: calls.append((value, tags)))
    busy = {"running": 1, "moe": {"expert_tokens": [[1, 0, 3]]}}
    for _ in range(metrics_module.EXPERT_FLUSH_STEPS - 1):
        metrics.on_step(busy)
    assert calls == [] and metrics.snapshot()["expert_tokens/0/2"] == 3 * (metrics_module.EXPERT_FLUSH_STEPS - 1)
    metrics.on_step(busy)  # the 16th step flushes one update per (layer, expert)
    n = metrics_module.EXPERT_FLUSH_STEPS
    assert sorted(calls, key=lambda c: c[1]["expert"]) == [(n, {"layer": "0", "expert": "0"}),
                                                           (3 * n, {"layer": "0", "expert": "2"})]
    calls.clear()
    metrics.on_step(busy)
    metrics.on_step({"running": 0, "moe": {"expert_tokens": [[0, 2, 0]]}})  # idle: flush at once
    assert sorted(calls, key=lambda c: c[1]["expert"]) == [(1, {"layer": "0", "expert": "0"}),
                                                           (2, {"layer": "0", "expert": "1"}),
                                                           (3, {"layer": "0", "expert": "2"})]


def test_the_engine_is_built_and_stepped_on_its_own_thread(tiny_model, monkeypatch):
    """All torch work stays on the engine thread: one that ran after another thread's torch ops ran
    1.6x slower on the 2-core VM."""
    threads = []
    build, step = LLMEngine.__init__, LLMEngine.step

    def recording_build(self, *args, **kwargs):
        threads.append(("build", threading.current_thread().name))
        build(self, *args, **kwargs)

    def recording_step(self):
        threads.append(("step", threading.current_thread().name))
        return step(self)

    monkeypatch.setattr(LLMEngine, "__init__", recording_build)
    monkeypatch.setattr(LLMEngine, "step", recording_step)
    engine = AsyncLLMEngine(config(tiny_model("olmoe")), model_name="tiny")
    try:
        run(collect(engine, [1, 2, 3], GREEDY))
    finally:
        engine.shutdown()
    assert threads[0] == ("build", "moe-engine")
    assert {name for _, name in threads} == {"moe-engine"}


def test_a_model_that_cannot_load_raises_from_the_constructor(tmp_path):
    before = set(threading.enumerate())
    with pytest.raises(Exception, match="config.json"):
        AsyncLLMEngine(EngineConfig(model=str(tmp_path)))
    assert not [t for t in set(threading.enumerate()) - before if t.name == "moe-engine"]


def test_a_failure_after_the_engine_is_built_ends_its_thread(tiny_model, monkeypatch):
    import cluster.async_engine as async_engine

    def broken(name):
        raise RuntimeError("metrics unavailable")

    monkeypatch.setattr(async_engine, "EngineMetrics", broken)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="metrics unavailable"):
        AsyncLLMEngine(config(tiny_model("olmoe")), model_name="tiny")
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=10)
        assert not thread.is_alive(), thread.name

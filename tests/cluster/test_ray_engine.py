"""The engine on a local multi-node Ray cluster: same tokens as in-process, placement by label,
hand-checked byte counters, and recovery from killed actors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import LLMEngine  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402
from tests.conftest import NODE_LABEL  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3)


def _run(config: EngineConfig, *params: SamplingParams, prompts=PROMPTS) -> list[list[tuple[int, ...]]]:
    engine = LLMEngine(config)
    try:
        return [[o.token_ids for o in engine.generate(prompts, p)] for p in params]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family, transport", [("mixtral", "tcp"), ("qwen2_moe", "tcp"), ("qwen3_moe", "tcp"),
                                               ("olmoe", "tcp"), ("olmoe", "gloo")])
def test_tokens_match_inprocess(ray_cluster, tiny_model, family, transport):
    model = str(tiny_model(family))
    expected = _run(EngineConfig(model=model), GREEDY, SAMPLED)
    # min_microbatch_tokens=1: every step with two or more requests runs as ping-pong micro-batches.
    assert _run(EngineConfig(model=model, engine="ray", cluster="local", min_microbatch_tokens=1, transport=transport),
                GREEDY, SAMPLED) == expected


@pytest.mark.parametrize("workers", [1, 2])
def test_prefix_caching_on_the_cluster_keeps_the_tokens(ray_cluster, tiny_model, workers):
    """Prompts sharing 24 tokens: the later ones start after the cached blocks of the attention worker
    they start on (with two workers, sequence i on worker i mod 2: each computes the prefix once)."""
    model = str(tiny_model("olmoe"))
    prompts = [list(range(10, 34)) + [i] for i in range(5)]
    expected = [o for batch in _run(EngineConfig(model=model, block_size=8), GREEDY, prompts=prompts) for o in batch]
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local", block_size=8,
                                    enable_prefix_caching=True, num_attention_workers=workers))
    try:
        got = [o.token_ids for p in prompts for o in engine.generate([p], GREEDY)]
        assert got == expected and engine.scheduler.prefix_hit_tokens == (5 - workers) * 24
    finally:
        engine.shutdown()


def test_prompt_logprobs_on_the_cluster_match_inprocess(ray_cluster, tiny_model):
    """Two attention workers, ping-pong micro-batches and chunked prefill: each prompt's scores come
    back from the worker and micro-batch that held it, in its own order, across steps."""
    model = str(tiny_model("olmoe"))
    prompts = [list(range(10, 40)), [7, 8, 9, 11], list(range(50, 71)), [3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    want = LLMEngine(EngineConfig(model=model, max_num_batched_tokens=16)).generate(prompts, params)
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local", num_attention_workers=2,
                                    min_microbatch_tokens=1, max_num_batched_tokens=16))
    try:
        got = engine.generate(prompts, params)
    finally:
        engine.shutdown()
    for g, w, p in zip(got, want, prompts):
        assert g.token_ids == w.token_ids
        assert [lp.token_id for lp in g.prompt_logprobs] == p[1:]
        assert [lp.logprob for lp in g.prompt_logprobs] == pytest.approx([lp.logprob for lp in w.prompt_logprobs],
                                                                         abs=1e-5)
        assert [[t for t, _ in lp.top] for lp in g.prompt_logprobs] == [[t for t, _ in lp.top]
                                                                       for lp in w.prompt_logprobs]


def test_speculative_decoding_on_the_cluster_keeps_the_greedy_tokens(ray_cluster):
    """Draft chunks split over two attention workers and ping-pong micro-batches: each sequence's
    rows come back in order, and the kept drafts' K/V is what the next step reads."""
    from cluster.demo import ensure_demo_model

    model = str(ensure_demo_model())
    prompts = ["class Foo:\n    def __init__(self, x):\n        self.x = x\n", "import os\nimport sys\n\n",
               "def add(a, b):\n    return a + b\n"]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = LLMEngine(EngineConfig(model=model)).generate(prompts, params)
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local", num_attention_workers=2,
                                    min_microbatch_tokens=1, num_speculative_tokens=4))
    try:
        got = engine.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert engine.num_accepted_tokens > 0
    finally:
        engine.shutdown()


def test_actors_run_on_their_labelled_nodes(ray_cluster, tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster="local"))
    try:
        labels = {n["NodeID"]: n["Labels"][NODE_LABEL] for n in ray.nodes() if n["Alive"]}
        model = engine.model
        kinds = {w.name: w.kind for w in (*model.plan.attention_workers, *model.plan.expert_shards)}
        nodes = ray.get([a.node_id.remote() for a in model.actors])
        names = [w.name for w in (*model.plan.attention_workers, *model.plan.expert_shards)]
        assert [labels[n] for n in nodes] == [kinds[name] for name in names]
        assert labels[nodes[0]] == "cpu-highmem"  # attention offloaded to the memory node
        assert {labels[n] for n in nodes[1:]} == {"gpu", "cpu"}
    finally:
        engine.shutdown()


def _cluster_file(tmp_path: Path, attention_kind_role: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"""
label_key: {NODE_LABEL}
nodes:
  - {{kind: head, memory_gb: 1, role: none}}
  - {{kind: cpu-highmem, memory_gb: 4, role: {attention_kind_role}, resources: {{cpu_highmem: 1}}}}
  - {{kind: gpu, memory_gb: 4, role: experts, resources: {{fake_gpu: 1}}}}
""")
    return str(path)


@pytest.mark.parametrize("colocated, microbatches, transport", [(False, 1, "tcp"), (True, 1, "tcp"), (False, 2, "tcp"),
                                                               (False, 1, "gloo")])
def test_cross_node_bytes_match_hand_computation(ray_cluster, tiny_model, tmp_path, colocated, microbatches,
                                                 transport):
    """4 experts, top-4, 2 shards of 2 experts: every token goes to both shards with 2 pairs each.
    With ping-pong on, 7 tokens are below the split threshold: the step still runs as one micro-batch."""
    model = tiny_model("olmoe", num_experts=4, num_experts_per_tok=4)
    role = "any" if colocated else "attention"  # "any": one shard shares the attention node
    config = EngineConfig(model=str(model), engine="ray", cluster=_cluster_file(tmp_path, role),
                          num_expert_shards=2, microbatches=microbatches, transport=transport)
    engine = LLMEngine(config)
    try:
        t = 7
        engine.generate([list(range(1, t + 1))], SamplingParams(max_tokens=1, temperature=0.0))
        spec, traffic, top = engine.spec, engine.model.traffic, engine.model.topology
        h, dispatch, combine, messages = spec.hidden_size, 0, 0, 0
        for layer in spec.moe_layers:
            for s in range(2):
                if top.node_of[top.num_attention + s] == top.node_of[0]:
                    continue  # "any": this shard shares the attention worker's node
                held = sorted(e for e, o in enumerate(engine.model.owner[layer]) if o == s)
                dispatch += 24 + 2 * t * 16 + t * h * 4  # header + 2 pairs (row, id, fold, weight) + rows
                # a shard holding every token's two lowest experts returns their sum: one row a token
                combine += (t if held == [0, 1] else 2 * t) * h * 4
                messages += 2  # the tokens in one message, the outputs in one
        assert traffic.steps == 1 and messages == len(spec.moe_layers) * (1 if colocated else 2) * 2
        assert (traffic.dispatch_bytes, traffic.combine_bytes, traffic.messages) == (dispatch, combine, messages)
        assert sorted(traffic.per_layer) == list(spec.moe_layers)
        stats = engine.last_step_stats  # what the serving metrics read
        assert stats["cross_node_bytes"] == {"dispatch": traffic.dispatch_bytes, "combine": traffic.combine_bytes}
        assert stats["expert_tokens"] == {layer: [t] * 4 for layer in spec.moe_layers}
    finally:
        engine.shutdown()


@pytest.mark.parametrize("transport", ["tcp", "gloo"])
@pytest.mark.parametrize("victim", ["shard", "attention"])
def test_killed_actor_is_replaced_and_requests_complete(ray_cluster, tiny_model, victim, transport):
    model = str(tiny_model("qwen3_moe"))
    params = SamplingParams(max_tokens=16, temperature=0.0)
    [expected] = _run(EngineConfig(model=model), params)
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local", transport_timeout_s=10,
                                    min_microbatch_tokens=1, transport=transport))
    try:
        ids = [engine.add_request(p, params) for p in PROMPTS]
        final = {}
        for _ in range(4):
            for o in engine.step():
                final.update({o.request_id: o} if o.finished else {})
        target = engine.model.shards[0] if victim == "shard" else engine.model.attention[0]
        ray.kill(target)
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    final[o.request_id] = o
        assert engine.model.recoveries == 1
        assert [final[i].token_ids for i in ids] == expected
        assert all(final[i].finish_reason == "length" for i in ids)
        again = engine.generate([PROMPTS[0]], params)[0]  # served after recovery
        assert again.token_ids == expected[0]
    finally:
        engine.shutdown()


def test_experts_move_between_shards_while_requests_run(ray_cluster, tiny_model):
    model = str(tiny_model("olmoe"))
    [expected] = _run(EngineConfig(model=model), GREEDY)
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local"))
    try:
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        final = {}
        for _ in range(3):
            final.update({o.request_id: o for o in engine.step() if o.finished})
        m = engine.model
        before = {layer: list(row) for layer, row in m.owner.items()}
        swapped = {layer: tuple(reversed(row)) for layer, row in m.owner.items()}  # every expert changes shard
        with pytest.raises(ValueError, match="every expert"):
            m.move_experts({layer: row[:-1] for layer, row in swapped.items()})
        report = m.move_experts(swapped)
        assert report["experts_moved"] == sum(a != b for layer in before for a, b in zip(before[layer], swapped[layer]))
        assert report["bytes_loaded"] > 0 and m.owner == swapped
        final.update({o.request_id: o for o in engine.step() if o.finished})
        replanned = m.replan_experts()  # from the routes seen so far
        capacity = max(max(row.count(s) for s in set(row)) for row in map(list, swapped.values()))
        assert all(list(row).count(s) <= capacity for row in m.owner.values() for s in range(len(m.shards)))
        assert replanned["experts_moved"] == sum(a != b for layer in swapped
                                                 for a, b in zip(swapped[layer], m.owner[layer]))
        while engine.has_unfinished():
            final.update({o.request_id: o for o in engine.step() if o.finished})
        assert [final[i].token_ids for i in ids] == expected
    finally:
        engine.shutdown()


def test_a_plan_the_cluster_cannot_host_fails_fast_and_says_why(ray_cluster, tiny_model, tmp_path):
    path = tmp_path / "tpu.yaml"
    path.write_text("""
label_key: moe-serve/node-kind
nodes:
  - {kind: cpu-highmem, memory_gb: 8, role: attention, resources: {cpu_highmem: 1}}
  - {kind: tpu, memory_gb: 8, role: experts}
""")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"shard-0 needs a node with label moe-serve/node-kind=tpu") as err:
        LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=str(path)))
    assert "node kinds here: " in str(err.value) and "gpu" in str(err.value)
    assert time.monotonic() - start < 60  # refused up front, not after the actors' start timeout


@pytest.mark.parametrize("policy, prefetch", [("lru", False), ("adaptive", True)])
def test_expert_shards_with_a_cache_keep_the_tokens_and_survive_a_move(ray_cluster, tiny_model, policy, prefetch):
    """Each shard keeps half of its experts resident: the in-process tokens, the shards' hit rates in the
    step stats, and a re-placement that the caches follow; with prefetch, the attention workers' pre-gating
    hints reach the shards, which load predicted experts ahead."""
    model = str(tiny_model("mixtral"))
    [expected] = _run(EngineConfig(model=model), SAMPLED)
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local", expert_cache_fraction=0.5,
                                    expert_cache_policy=policy, expert_cache_prefetch=prefetch))
    try:
        ids = [engine.add_request(p, SAMPLED) for p in PROMPTS]
        final, looked_up, hits, steps, prefetched, used = {}, 0, 0, 0, 0, 0
        while engine.has_unfinished():
            final.update({o.request_id: o for o in engine.step() if o.finished})
            steps += 1
            cache = engine.model.step_stats()["expert_cache"]
            looked_up, hits = looked_up + cache["hits"] + cache["misses"], hits + cache["hits"]
            prefetched, used = prefetched + cache["prefetches"], used + cache["prefetch_used"]
            assert cache["loads"] + cache["cpu_computed"] == cache["misses"]
            if steps == 4:  # mid-generation: every expert changes shard, the caches start over
                m = engine.model
                assert m.move_experts({layer: tuple(reversed(row)) for layer, row in m.owner.items()})["bytes_loaded"] == 0
        assert steps > 4
        assert [final[i].token_ids for i in ids] == expected
        assert 0 < hits < looked_up
        assert (prefetched > 0) == prefetch and (used > 0) == prefetch  # hints arrive, and some were right
    finally:
        engine.shutdown()


def test_traces_and_live_route_prediction_match_the_inprocess_engine(ray_cluster, tiny_model, tmp_path):
    """The cluster records the same routing decisions, in the same order, and its live predictors see
    the same routes and pre-gating guesses, so their recall is the same."""
    from router.traces import read_trace

    model = str(tiny_model("qwen3_moe"))
    reports = {}
    for engine_kind in ("inprocess", "ray"):
        path = tmp_path / f"{engine_kind}.jsonl"
        extra = {"cluster": "local", "min_microbatch_tokens": 1} if engine_kind == "ray" else {}
        engine = LLMEngine(EngineConfig(model=model, engine=engine_kind, record_trace=str(path),
                                        route_prediction=True, **extra))
        try:
            engine.generate(PROMPTS, GREEDY)
            reports[engine_kind] = engine.route_meter.report()
        finally:
            engine.shutdown()
        records = read_trace(path)
        reports[engine_kind]["records"] = [(r.pos, r.layer, r.experts) for r in records]
        reports[engine_kind]["weights"] = [w for r in records for w in r.weights]
    weights = reports["ray"].pop("weights")
    assert len(reports["ray"]["records"]) > 0
    assert weights == pytest.approx(reports["inprocess"].pop("weights"), abs=1e-5)  # micro-batches: fp noise
    assert reports["ray"] == reports["inprocess"]

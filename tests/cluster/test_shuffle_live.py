"""Request shuffling on a local multi-node Ray cluster: sequences move between attention workers (KV
copied, bytes counted) and the tokens stay those of the in-process engine, with the real policy and
with one that moves every sequence every step (a deliberately wrong predictor)."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import LLMEngine  # noqa: E402
from cluster.moe_dispatch import HEADER_BYTES  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402
from router.shuffle import RequestShuffler, ShuffleConfig  # noqa: E402
from tests.conftest import NODE_LABEL  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [5, 4, 3, 2, 1, 0]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3)


class Contrary:
    """Moves every running sequence to the next attention worker at every step."""

    def __init__(self, workers: int) -> None:
        self.workers, self.observed = workers, 0

    def observe(self, seq_id, hits) -> None:
        self.observed += len(hits)

    def forget(self, seq_id) -> None:
        pass

    def plan(self, running, load, geometry):
        return {sid: (here + 1) % self.workers for sid, (here, _) in running.items()}


def _colocated(tmp_path: Path) -> str:
    """Two nodes, each with one attention worker and one expert shard."""
    path = tmp_path / "cluster.yaml"
    path.write_text(f"""
label_key: {NODE_LABEL}
nodes:
  - {{kind: head, memory_gb: 1, role: none}}
  - {{kind: cpu-highmem, memory_gb: 4, role: any, resources: {{cpu_highmem: 1}}}}
  - {{kind: cpu, memory_gb: 4, role: any}}
""")
    return str(path)


def _generate(engine: LLMEngine, *params: SamplingParams) -> list[list[tuple[int, ...]]]:
    return [[o.token_ids for o in engine.generate(PROMPTS, p)] for p in params]


def _kv_bytes_per_token(engine: LLMEngine) -> int:
    spec = engine.model.spec
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4  # float32


@pytest.fixture(scope="module")
def expected(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe"))))
    try:
        return _generate(engine, GREEDY, SAMPLED)
    finally:
        engine.shutdown()


def test_sequences_forced_to_move_every_step_keep_their_tokens(ray_cluster, tiny_model, tmp_path, expected):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=_colocated(tmp_path),
                                    num_attention_workers=2, num_expert_shards=2, request_shuffling=True,
                                    min_microbatch_tokens=1))
    try:
        model = engine.model
        nodes = model.topology.node_of
        assert nodes[0] != nodes[1] and {nodes[2], nodes[3]} == {nodes[0], nodes[1]}  # one of each per node
        model.shuffler = Contrary(2)
        contexts = []  # positions cached by each running sequence at each step: what every move copies
        execute = model.execute

        def counting(out):
            contexts.append([c.start for c in out.chunks if c.start > 0])
            return execute(out)

        model.execute = counting
        assert _generate(engine, GREEDY, SAMPLED) == expected
        assert model.traffic.sequences_moved == sum(map(len, contexts)) > 0
        assert model.step_stats()["sequences_moved"] == len(contexts[-1])  # the last step's
        assert model.traffic.migrate_bytes == sum(map(sum, contexts)) * _kv_bytes_per_token(engine)
        assert model.kv_at == {}  # every finished sequence was released
        assert model.shuffler.observed > 0
    finally:
        engine.shutdown()


def test_the_shuffling_policy_keeps_the_tokens_and_reports_what_it_moved(ray_cluster, tiny_model, tmp_path, expected):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=_colocated(tmp_path),
                                    num_attention_workers=2, num_expert_shards=2, request_shuffling=True,
                                    shuffle_max_load=2.0))
    try:
        m = engine.model
        assert m.shuffler.config.max_load_ratio == 2.0  # EngineConfig.shuffle_max_load reached the policy
        # The real policy, eager: any predicted saving pays for the copy, and one worker may hold them all.
        m.shuffler = RequestShuffler(ShuffleConfig(payback_tokens=10**9, max_load_ratio=2.0))
        planned, shuffle, steps = [], m.homes.shuffle, []
        m.homes.shuffle = lambda running: planned.append(shuffle(running)) or planned[-1]
        execute = m.execute
        m.execute = lambda out: (execute(out), steps.append(m.step_stats()))[0]
        assert _generate(engine, GREEDY, SAMPLED) == expected
        moves = [move for step in planned for move in step]
        assert moves and all(move.src != move.dst for move in moves)
        assert m.traffic.sequences_moved == len(moves) == sum(s["sequences_moved"] for s in steps)
        assert m.traffic.migrate_bytes == sum(move.cross_node_bytes for move in moves) > 0
        assert sum(s["cross_node_bytes"]["migrate"] for s in steps) == m.traffic.migrate_bytes
        assert m.traffic.migrate_bytes % _kv_bytes_per_token(engine) == 0
    finally:
        engine.shutdown()


def test_sequences_preempted_for_lack_of_cache_are_forgotten_and_keep_their_tokens(ray_cluster, tiny_model, tmp_path,
                                                                                    expected):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=_colocated(tmp_path),
                                    num_attention_workers=2, num_expert_shards=2, request_shuffling=True,
                                    kv_cache_tokens=48, block_size=4))
    try:
        m = engine.model
        m.shuffler = Contrary(2)
        step = engine.step

        def checked():
            outs = step()
            running = {q.seq_id for q in engine.scheduler.running}
            assert set(m.kv_at) <= running  # preempted (and finished) sequences were released
            return outs

        engine.step = checked
        assert _generate(engine, GREEDY, SAMPLED) == expected
        assert engine.scheduler.num_preemptions > 0 and m.kv_at == {}
    finally:
        engine.shutdown()


def test_with_prefix_caching_a_moved_sequence_registers_no_block_it_completed_elsewhere(ray_cluster, tiny_model,
                                                                                         tmp_path):
    """Sequence 0 prefills 7 tokens on worker 0 (block 0 cached there), is moved to worker 1, completes
    block 1 there with its first output token and finishes. Sequence 2 starts on worker 0 with those
    8 tokens and more: only block 0 may be reused, since worker 0 never got block 1's last position."""
    model = str(tiny_model("olmoe"))
    first, greedy = [11, 12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(model=model))
    (o1, _) = plain.generate([first], greedy)[0].token_ids
    later = first + [o1, 5, 6]
    [want] = plain.generate([later], GREEDY)
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster=_colocated(tmp_path), num_attention_workers=2,
                                    num_expert_shards=2, request_shuffling=True, enable_prefix_caching=True,
                                    block_size=4))
    try:
        engine.model.shuffler = Contrary(2)
        assert engine.generate([first], greedy)[0].token_ids[0] == o1  # sequence 0
        engine.generate([[3, 2, 1]], greedy)  # sequence 1, on worker 1
        assert engine.generate([later], GREEDY)[0].token_ids == want.token_ids  # sequence 2
        assert engine.scheduler.prefix_hit_tokens == 4 and engine.model.traffic.sequences_moved > 0
    finally:
        engine.shutdown()


def test_drafts_of_sequences_moved_every_step_keep_the_greedy_tokens(ray_cluster, tmp_path):
    """Speculative decoding with request shuffling: each step a sequence's computed K/V moves, then
    its last token and drafts are written and attended on the new worker."""
    from cluster.demo import ensure_demo_model

    model = str(ensure_demo_model())
    prompts = ["class Foo:\n    def __init__(self, x):\n        self.x = x\n", "import os\nimport sys\n\n"]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLMEngine(EngineConfig(model=model)).generate(prompts, params)]
    engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster=_colocated(tmp_path), num_attention_workers=2,
                                    num_expert_shards=2, request_shuffling=True, num_speculative_tokens=4))
    try:
        engine.model.shuffler = Contrary(2)
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
        assert engine.num_accepted_tokens > 0 and engine.model.traffic.sequences_moved > 0
    finally:
        engine.shutdown()


def test_request_shuffling_needs_the_cluster_engine(tiny_model):
    with pytest.raises(ValueError, match="request_shuffling"):
        EngineConfig(model=str(tiny_model("olmoe")), request_shuffling=True)


def test_replicas_keep_tokens_on_their_node(ray_cluster, tiny_model, tmp_path, expected):
    """Every shard holds every expert (each as owner or replica): no token leaves its node, and the
    tokens stay those of the in-process engine, with sequences moving every step too."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=_colocated(tmp_path),
                                    num_attention_workers=2, num_expert_shards=2, request_shuffling=True))
    try:
        m = engine.model
        everything = [{layer: tuple(e for e, s in enumerate(row) if s != shard) for layer, row in m.owner.items()}
                      for shard in range(2)]
        report = m.move_experts(m.owner, everything)
        assert report["experts_moved"] == 0 and report["replicas"] == sum(len(r) for r in m.owner.values())
        assert report["bytes_loaded"] > 0
        with pytest.raises(ValueError, match="does not route to"):
            m.move_experts(m.owner, [{0: (99,)}, {}])
        m.shuffler = Contrary(2)
        t = m.traffic
        before = (t.dispatch_bytes, t.combine_bytes, t.messages)
        assert _generate(engine, GREEDY, SAMPLED) == expected
        # what still crosses: the empty message each worker sends each remote shard per layer (a header)
        assert t.combine_bytes == before[1] and t.migrate_bytes > 0
        assert t.dispatch_bytes - before[0] == (t.messages - before[2]) * HEADER_BYTES > 0
        m.move_experts(m.owner)  # replicas dropped: tokens cross nodes again
        m.shuffler = None
        assert _generate(engine, GREEDY) == expected[:1]
        assert t.dispatch_bytes > before[0]
    finally:
        engine.shutdown()


def test_periodic_replanning_with_copies_keeps_the_tokens(ray_cluster, tiny_model, tmp_path, expected):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=_colocated(tmp_path),
                                    num_attention_workers=2, num_expert_shards=2, request_shuffling=True,
                                    replan_every_steps=3, expert_replicas=1))
    try:
        assert _generate(engine, GREEDY, SAMPLED) == expected
        copies = engine.model.replicas
        assert 0 < sum(len(ids) for r in copies for ids in r.values()) <= 2 * len(engine.model.owner)
        held = engine.model.shard_experts
        for shard, extra in enumerate(copies):  # a shard holds its copies, which it does not own
            for layer, ids in extra.items():
                assert set(ids) <= set(held[shard][layer])
                assert all(engine.model.owner[layer][e] != shard for e in ids)
    finally:
        engine.shutdown()


def test_copies_need_periodic_replanning(tiny_model):
    model = str(tiny_model("olmoe"))
    with pytest.raises(ValueError, match="expert_replicas is applied by re-planning: set replan_every_steps"):
        EngineConfig(model=model, engine="ray", expert_replicas=1)
    with pytest.raises(ValueError, match="expert_replicas must be >= 0, got -1"):
        EngineConfig(model=model, engine="ray", replan_every_steps=4, expert_replicas=-1)
    with pytest.raises(ValueError, match="replan_every_steps needs engine='ray'"):
        EngineConfig(model=model, replan_every_steps=4)


def test_the_serve_builder_refuses_conflicting_settings_before_deploying():
    from cluster.serve_app import build_app

    for args, words in (({"request_shuffling": True}, "request_shuffling needs engine='ray'"),
                        ({"engine": "ray", "expert_replicas": 2}, "set replan_every_steps")):
        with pytest.raises(ValueError, match=words):
            build_app(args)


def test_a_worker_killed_while_sequences_move_is_replaced_and_requests_complete(ray_cluster, tiny_model, tmp_path,
                                                                                 expected):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("olmoe")), engine="ray", cluster=_colocated(tmp_path),
                                    num_attention_workers=2, num_expert_shards=2, request_shuffling=True,
                                    transport_timeout_s=10))
    try:
        m = engine.model
        m.shuffler = Contrary(2)
        ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
        final = {}
        for _ in range(3):
            final.update({o.request_id: o for o in engine.step() if o.finished})
        ray.kill(m.attention[1])  # its sequences' KV is lost, and the next step copies KV from or to it
        while engine.has_unfinished():
            final.update({o.request_id: o for o in engine.step() if o.finished})
        assert m.recoveries == 1
        assert [final[i].token_ids for i in ids] == expected[0]
        assert m.kv_at == {}
    finally:
        engine.shutdown()

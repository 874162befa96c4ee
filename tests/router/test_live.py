"""Live route prediction: recall measured beside the engine, never changing what it generates."""

from __future__ import annotations

import random

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from router.live import LiveRouteMeter


def chain_step(first: int, pos: int) -> tuple[list[tuple[str, int]], dict, dict]:
    """One token whose layer-l+1 expert is a function of its layer-l expert; pre-gating is always right."""
    ids = [first, (first * 3 + 1) % 8, (first * 5 + 2) % 8]
    routes = {layer: ([[e]], [[1.0]]) for layer, e in enumerate(ids)}
    return [("r", pos)], routes, {layer: [[e]] for layer, e in enumerate(ids) if layer > 0}


def test_a_learnable_chain_is_predicted_and_pregate_scored():
    meter, rng = LiveRouteMeter([0, 1, 2], num_experts=8, top_k=1), random.Random(0)
    for pos in range(600):
        meter.observe_step(*chain_step(rng.randrange(8), pos))
    recall = meter.recall()
    assert recall[1] > 0.9 and recall[2] > 0.9  # the affinity tables learned the chain
    assert meter.report()["pregate"]["recall_d1"] == 1.0


def test_live_recall_on_the_trained_demo_model_and_identical_tokens():
    model = str(ensure_demo_model())
    prompts = ["class Server:\n", "def parse(argv):\n"]
    params = SamplingParams(max_tokens=64, temperature=0.8, seed=3, ignore_eos=True)
    plain = LLMEngine(EngineConfig(model=model)).generate(prompts, params)
    engine = LLMEngine(EngineConfig(model=model, route_prediction=True))
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    uniform = engine.spec.top_k / engine.spec.num_experts
    report = engine.route_meter.report()
    assert report["pregate"]["recall_d1"] > 3 * uniform and report["mixture"]["recall_d1"] > 2 * uniform
    assert set(engine.last_step_stats["route_prediction_recall"]) == {1, 2}

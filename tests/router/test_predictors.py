"""Route predictors and the recall meter on synthetic routes whose answers are known."""

from __future__ import annotations

import random

import numpy as np
import pytest

from router.predictors import (AffinityPredictor, MixturePredictor, PregatePredictor, PreviousRoutePredictor,
                               RecallMeter, RouteContext, top_k_ids)

LAYERS, EXPERTS, K = 6, 8, 2


def chain_tokens(n: int, seed: int = 0):
    """Deterministic chains: a token keeps its random expert pair at every layer (l: e -> l+1: e)."""
    rng = random.Random(seed)
    return [tuple(rng.sample(range(EXPERTS), K)) for _ in range(n)]


def run(predictor, routes_per_token, request="r", distance=2, warm=0):
    """Feeds tokens in order; after `warm` tokens, measures recall of predict() for l+1..l+distance."""
    meter = RecallMeter(distance, LAYERS)
    for pos, routes in enumerate(routes_per_token):
        route = {}
        for layer in range(LAYERS):
            predictor.observe(request, pos, layer, routes[layer])
            route[layer] = routes[layer]
            if pos < warm:
                continue
            for target, ids in predictor.predict(RouteContext(request, pos, layer, route), distance, K).items():
                meter.update(layer, target, ids, routes[target])
    return meter


def test_affinity_learns_a_deterministic_chain():
    tokens = [[pair] * LAYERS for pair in chain_tokens(80)]
    meter = run(AffinityPredictor(LAYERS, EXPERTS, max_distance=2), tokens, warm=40)
    assert meter.recall(1) == 1.0 and meter.recall(2) == 1.0


def test_affinity_without_data_falls_back_to_popularity():
    p = AffinityPredictor(LAYERS, EXPERTS)
    for pos in range(5):
        p.observe("r", pos, 3, (6, 2))  # layer 3 popularity only
    ctx = RouteContext("s", 0, 2, {2: (0, 1)})
    assert set(p.predict(ctx, 1, K)[3]) == {6, 2}
    assert p.scores(ctx, 5) is None  # beyond max_distance


def test_previous_route_uses_the_previous_token_of_the_same_request():
    p = PreviousRoutePredictor(LAYERS, EXPERTS)
    p.observe("a", 0, 1, (4, 5))
    p.observe("b", 0, 1, (6, 7))
    assert set(p.predict(RouteContext("a", 1, 0, {0: (0, 1)}), 1, K)[1]) == {4, 5}
    assert p.predict(RouteContext("c", 1, 0, {0: (0, 1)}), 1, K) == {}  # no history for request c
    p.observe("a", 1, 1, (2, 3))  # the current token's own route is never its "previous" one
    assert p.scores(RouteContext("a", 1, 1, {1: (2, 3)}), 1) is None
    p.finish("a")
    assert p.scores(RouteContext("a", 2, 0, {0: (0, 1)}), 1) is None


def test_previous_route_calibrates_how_often_routes_recur():
    p = PreviousRoutePredictor(LAYERS, EXPERTS)
    for pos in range(50):
        p.observe("r", pos, 2, (1, 3))  # always repeats
    s = p.scores(RouteContext("r", 50, 1, {1: (0, 1)}), 2)
    assert s[1] == s[3] and s[1] > 0.45 and s.sum() == pytest.approx(1.0)


def test_previous_route_recall_on_repeating_requests():
    routes = [tuple(random.Random(layer).sample(range(EXPERTS), K)) for layer in range(LAYERS)]
    meter = run(PreviousRoutePredictor(LAYERS, EXPERTS), [routes] * 10, warm=1)
    assert meter.recall(1) == 1.0


def test_mixture_pools_and_weights_components():
    prev, aff = PreviousRoutePredictor(LAYERS, EXPERTS), AffinityPredictor(LAYERS, EXPERTS)
    prev.observe("r", 0, 1, (6, 7))
    for pos in range(30):
        aff.observe("t", pos, 0, (0, 1))
        aff.observe("t", pos, 1, (2, 3))
    ctx = RouteContext("r", 1, 0, {0: (0, 1)})
    only_prev = MixturePredictor([prev, aff], [1.0, 0.0])
    assert set(only_prev.predict(ctx, 1, K)[1]) == {6, 7}
    only_aff = MixturePredictor([prev, aff], [0.0, 1.0], pool="linear")
    assert set(only_aff.predict(ctx, 1, K)[1]) == {2, 3}
    both = MixturePredictor([prev, aff]).scores(ctx, 1)
    assert both.sum() == pytest.approx(1.0) and both[[2, 3, 6, 7]].min() > both[[0, 1, 4, 5]].max()
    with pytest.raises(ValueError, match="weight"):
        MixturePredictor([prev, aff], [1.0])
    with pytest.raises(ValueError, match="pool"):
        MixturePredictor([prev], pool="max")


def test_mixture_of_affinity_and_previous_learns_chains():
    tokens = [[pair] * LAYERS for pair in chain_tokens(80, seed=1)]
    mix = MixturePredictor([AffinityPredictor(LAYERS, EXPERTS, 2), PreviousRoutePredictor(LAYERS, EXPERTS)])
    assert run(mix, tokens, warm=40).recall(1) == 1.0


def test_pregate_reads_hidden_state_scores_from_the_context():
    p = PregatePredictor(LAYERS, EXPERTS)
    scores = np.zeros(EXPERTS)
    scores[[3, 5]] = [0.2, 0.7]
    ctx = RouteContext("r", 0, 1, {1: (0, 1)}, pregate={2: scores.tolist()})
    assert p.predict(ctx, 2, K) == {2: (5, 3)}
    with pytest.raises(ValueError, match="pregate"):
        p.scores(RouteContext("r", 0, 1, {}, pregate={2: [1.0, 2.0]}), 2)


def test_recall_meter_by_hand():
    m = RecallMeter(2, 4)
    m.update(0, 1, (1, 2), (2, 3))  # 1 of 2
    m.update(1, 2, (0, 1), (0, 1))  # 2 of 2
    m.update(0, 2, (5, 6), (0, 1))  # distance 2: 0 of 2
    assert m.recall(1) == pytest.approx(0.75) and m.recall(2) == 0.0
    flat = m.as_dict(prefix="mix_", per_layer=True)
    assert flat["mix_recall_d1"] == pytest.approx(0.75)
    assert flat["mix_recall_d1_layer1"] == pytest.approx(0.5) and flat["mix_recall_d1_layer2"] == 1.0
    assert all(isinstance(v, float) for v in flat.values())
    with pytest.raises(ValueError, match="lookahead"):
        m.update(0, 3, (1,), (1,))


def test_top_k_and_bad_arguments():
    assert top_k_ids(np.array([0.1, 0.5, 0.5, 0.2]), 2) == (1, 2)
    with pytest.raises(ValueError):
        AffinityPredictor(0, 8)
    with pytest.raises(ValueError):
        AffinityPredictor(4, 8, smoothing=-1.0)

"""Routing statistics on a hand-made trace (answers counted by hand), other trace shapes, the shared trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.stats import (MISSING, best_transition_accuracy, coactivation, markov_routes, popularity, repetition,
                          route_table, summary, top1_transitions, transitions)
from router.traces import read_trace

ROOT = Path(__file__).resolve().parents[2]
# the shared folder sits beside the checkout (or, on a device machine, inside it)
SHARED_TRACE = next((p for p in (ROOT.parent / "shared", ROOT / "shared") if p.is_dir()), ROOT.parent / "shared") \
    / "traces" / "mixtral-8x7b-humaneval.jsonl"

# request a: tokens 0..2, request b: token 0; 2 layers, 4 experts, top-2 (file order deliberately shuffled)
HAND = [
    ("a", 0, 0, [0, 1]), ("a", 0, 1, [2, 3]),
    ("a", 2, 0, [3, 0]), ("a", 2, 1, [0, 1]),
    ("b", 0, 0, [0, 1]), ("b", 0, 1, [2, 3]),
    ("a", 1, 0, [0, 2]), ("a", 1, 1, [1, 2]),
]


def write_trace(path: Path, rows, pos_key: str = "token_idx", req_key: str = "problem_id") -> Path:
    with path.open("w") as f:
        for req, pos, layer, experts in rows:
            f.write(json.dumps({req_key: req, pos_key: pos, "layer": layer, "experts": experts}) + "\n")
    return path


@pytest.fixture()
def hand(tmp_path):
    return route_table(read_trace(write_trace(tmp_path / "hand.jsonl", HAND)))


def test_table_orders_tokens_by_request_then_position(hand):
    assert hand.requests == ("a", "b")
    assert hand.pos.tolist() == [0, 1, 2, 0]
    assert hand.experts[1, 1].tolist() == [1, 2]  # a, position 1, layer 1


def test_popularity_counts_token_expert_assignments(hand):
    assert popularity(hand).tolist() == [[4, 2, 1, 1], [1, 2, 3, 2]]


def test_coactivation_is_symmetric_pair_counts(hand):
    co = coactivation(hand)
    assert (co == co.transpose(0, 2, 1)).all() and (np.diagonal(co, axis1=1, axis2=2) == 0).all()
    assert (co[0, 0, 1], co[0, 0, 2], co[0, 0, 3], co[0, 1, 2]) == (2, 1, 1, 0)
    assert (co[1, 2, 3], co[1, 1, 2], co[1, 0, 1], co[1, 0, 3]) == (2, 1, 1, 0)


def test_transitions_count_every_expert_pair_of_consecutive_layers(hand):
    tr = transitions(hand)
    assert tr.shape == (1, 4, 4) and tr.sum() == 16  # 4 tokens x 2 x 2 pairs
    assert (tr[0, 0, 2], tr[0, 0, 3], tr[0, 1, 2], tr[0, 0, 1], tr[0, 3, 0], tr[0, 2, 0]) == (3, 2, 2, 2, 1, 0)
    assert transitions(hand, distance=2).shape == (0, 4, 4)
    # top-1 steps: 0->2, 0->1, 3->0, 0->2: guessing 2 after 0 and 0 after 3 is right 3 times of 4
    assert best_transition_accuracy(top1_transitions(hand)) == pytest.approx(0.75)


def test_repetition_compares_consecutive_tokens_of_one_request(hand):
    rep = repetition(hand)
    assert rep.pairs == 4  # (a0, a1) and (a1, a2) at 2 layers; b has one token
    assert rep.top1 == pytest.approx(0.25)  # only layer 0 of (a0, a1) repeats its top-1
    assert rep.overlap == pytest.approx(0.5)  # every pair shares exactly one of two experts
    assert rep.top1_per_layer.tolist() == [0.5, 0.0]


def test_token_pos_other_shapes_and_missing_layers(tmp_path):
    rows = [("r", 0, 0, [15, 3, 7, 1]), ("r", 0, 2, [2, 4, 6, 8]), ("r", 1, 0, [15, 4, 9, 0]),
            ("r", 1, 1, [5, 6, 7, 8]), ("r", 1, 2, [3, 2, 4, 5])]
    path = write_trace(tmp_path / "pos.jsonl", rows, pos_key="token_pos", req_key="request_id")
    table = route_table(read_trace(path))
    assert (table.num_tokens, table.num_layers, table.num_experts, table.top_k) == (2, 3, 16, 4)
    assert (table.experts[0, 1] == MISSING).all()
    assert popularity(table).sum(axis=1).tolist() == [8, 4, 8]
    assert summary(table)["repetition_top1"] == pytest.approx(0.5)  # layer 0: 15 -> 15, layer 2: 2 -> 3


def test_markov_routes_follow_their_stated_process():
    chains = route_table(markov_routes(2, 20, 6, 8, 2, affinity=1.0, repeat=0.0, seed=3))
    assert best_transition_accuracy(top1_transitions(chains)) == 1.0  # a permutation per layer
    repeats = route_table(markov_routes(2, 20, 6, 8, 2, affinity=0.0, repeat=1.0, seed=3))
    assert repetition(repeats).top1 == 1.0
    with pytest.raises(ValueError, match="affinity"):
        markov_routes(1, 2, 2, 4, 5, affinity=0.5, repeat=0.5)


@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason="shared trace absent")
def test_shared_trace_matches_its_readme():
    stats = summary(route_table(read_trace(SHARED_TRACE)))
    assert (stats["tokens"], stats["layers"], stats["experts"], stats["top_k"]) == (338, 32, 8, 2)
    assert stats["repetition_top1"] == pytest.approx(0.27, abs=0.01)
    assert stats["transition_top1_best_accuracy"] == pytest.approx(0.34, abs=0.01)

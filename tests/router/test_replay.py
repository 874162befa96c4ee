"""Placement replay: bytes of naive placement and of request shuffling, computed by hand on a small trace."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from router.replay import replay_placement
from router.traces import RouteRecord, write_record


def _trace() -> list[RouteRecord]:
    """Requests a (home node 0) and b (home node 1), 8 tokens each, 2 layers, top-1 of 4 experts on 2
    nodes (expert e on node e % 2): a always picks expert 1, b expert 3, both on node 1."""
    return [RouteRecord(req, pos, layer, (expert,), (1.0,))
            for pos in range(8) for req, expert in (("a", 1), ("b", 3)) for layer in range(2)]


def test_naive_bytes_match_a_hand_count():
    report = replay_placement(_trace(), nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=16)
    naive = report["schemes"]["naive"]
    # report tokens: positions 4-7 of each request (8 tokens). Each of a's tokens sends one 128-byte
    # vector to node 1 and gets one back at each of 2 layers; b's never leave node 1.
    assert naive["dispatch_bytes_per_token"] == naive["combine_bytes_per_token"] == 4 * 2 * 128 / 8
    assert report["naive_cross_node_bytes_per_token"] == 256
    for key in ("speculative_cross_node_bytes_per_token", "reduction", "max_over_mean_load"):
        assert key in report


def test_request_shuffling_moves_a_request_once_and_counts_its_kv():
    report = replay_placement(_trace(), nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=16)
    moved = report["schemes"]["request shuffling"]
    # before its first reported token (position 4) a moves to node 1, copying 4 positions x 2 layers
    # x 16 values x 2 bytes = 256 bytes; afterwards every dispatch is local
    assert moved["requests_moved"] == 1
    assert moved["migrate_bytes_per_token"] == 256 / 8
    assert moved["dispatch_combine_bytes_per_token"] == 0
    assert moved["reduction"] == pytest.approx(1 - 32 / 256)


def test_request_shuffling_stays_when_the_kv_copy_costs_more_than_it_saves():
    # 4 positions x 2 layers x 4096 values x 2 bytes = 65,536 bytes to copy; 64 tokens x 512 bytes saved
    report = replay_placement(_trace(), nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=4096)
    moved = report["schemes"]["request shuffling"]
    assert moved["requests_moved"] == 0
    assert moved["cross_node_bytes_per_token"] == report["naive_cross_node_bytes_per_token"]


def test_request_shuffling_plans_per_step_over_the_requests_still_running():
    """As the live engine: every request counts toward its node's load until its last token, and no longer.
    a, c (home node 0) and b, d (home 1) all use node 1's experts; b has 4 tokens, a 8, c and d 16."""
    lengths, expert = {"a": 8, "b": 4, "c": 16, "d": 16}, {"a": 1, "b": 3, "c": 1, "d": 3}
    trace = [RouteRecord(req, pos, layer, (expert[req],), (1.0,)) for req, n in lengths.items()
             for pos in range(n) for layer in range(2)]
    moved = replay_placement(trace, nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=16)["schemes"]["request shuffling"]
    # at position 4 all four run ([2, 2] requests per node, at most 3 a node): a moves, copying 4 positions
    # x 2 layers x 16 values x 2 bytes; at position 8 a and b have left ([1, 1], at most 2): c moves (8 positions)
    assert moved["requests_moved"] == 2
    report_tokens = 4 + 2 + 8 + 8
    assert moved["migrate_bytes_per_token"] == (256 + 512) / report_tokens
    assert moved["dispatch_combine_bytes_per_token"] == 0


def test_copies_of_the_experts_a_node_uses_keep_its_requests_local():
    # 2 experts, one per node, and every token uses both at both layers: no placement keeps a token
    # on one node, but a copy of the other expert on each node does
    trace = [RouteRecord(req, pos, layer, (0, 1), (0.5, 0.5)) for pos in range(8) for req in "ab"
             for layer in range(2)]
    report = replay_placement(trace, nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=16)
    assert report["schemes"]["naive"]["dispatch_combine_bytes_per_token"] == 2 * 2 * 128  # out and back, per layer
    copied = report["schemes"]["grouping+request shuffling+replicas"]
    assert copied["dispatch_combine_bytes_per_token"] == 0 and copied["requests_moved"] == 0
    assert copied["replica_memory_overhead"] == 1.0  # each node holds a copy of the other's expert
    assert copied["max_over_mean_load"] == 1.0
    none = replay_placement(trace, nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=16, replicas_per_layer=0)
    assert none["schemes"]["grouping+request shuffling+replicas"]["replica_memory_overhead"] == 0


def test_the_command_line_prints_the_report_as_json(tmp_path):
    path = tmp_path / "t.jsonl"
    with path.open("w") as f:
        for record in _trace():
            write_record(f, record)
    run = [sys.executable, "-m", "cluster.cli", "replay", "--trace", str(path), "--nodes", "2", "--hidden-size", "64",
           "--dtype-bytes", "2", "--kv-elems", "16", "--json"]
    res = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report == replay_placement(_trace(), nodes=2, hidden_size=64, dtype_bytes=2, kv_elems=16)
    for key in ("naive_cross_node_bytes_per_token", "speculative_cross_node_bytes_per_token", "reduction",
                "max_over_mean_load", "with_copies"):
        assert key in report
    res = subprocess.run(run + ["--replicas", "-1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--replicas must be >= 0, got -1" in res.stderr

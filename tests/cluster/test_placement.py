"""Cluster descriptions and the torch-free placement planner: labels, roles, budgets, balance."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.cluster_spec import (CLUSTERS_DIR, DEFAULT_LABEL_KEY, ClusterSpecError, cluster_from_dict,
                                  load_cluster)
from cluster.placement import ModelFootprint, PlacementError, PlannerConfig, plan
from cluster.plan_cli import footprint_of, run_plan
from experts.config import load_spec

MiB = 1 << 20
GiB = 1 << 30


def node(kind, memory_mib, role="any", speed=1.0, count=1, **extra):
    """A node kind with its budget given in MiB (memory_gb is GiB; MiB/1024 is exact in binary)."""
    return {"kind": kind, "memory_gb": memory_mib / 1024, "role": role, "speed": speed, "count": count, **extra}


def cluster(*nodes, **top):
    return cluster_from_dict({"nodes": list(nodes), **top}, source="test.yaml")


def footprint(layers=2, experts=8, expert_mib=1, dense_mib=10, kv_per_token=1024):
    return ModelFootprint(tuple(range(layers)), experts, expert_mib * MiB, dense_mib * MiB, kv_per_token)


def layer_loads(p, loads):
    """shard -> layer -> summed load of its experts."""
    return [{layer: sum(loads[layer][e] for e in ids) for layer, ids in s.experts.items()} for s in p.expert_shards]


def assert_every_expert_once(p, fp):
    for layer in fp.moe_layers:
        owned = sorted(e for s in p.expert_shards for e in s.experts[layer])
        assert owned == list(range(fp.num_experts))
        table = p.shard_table(layer)
        for s, shard in enumerate(p.expert_shards):
            assert all(table[e] == s and p.shard_of(layer, e) == s for e in shard.experts[layer])


def assert_within_budgets(p, fp):
    """Recompute every node's bytes from the actors on it; none exceeds its budget."""
    for n in p.nodes:
        here = [w.bytes for w in p.attention_workers if (w.kind, w.node_index) == (n.kind, n.index)]
        here += [s.num_experts * fp.expert_bytes for s in p.expert_shards if (s.kind, s.node_index) == (n.kind, n.index)]
        assert n.used_bytes == sum(here) <= n.budget_bytes


def test_placement_imports_neither_torch_nor_ray():
    code = "import cluster.placement, cluster.cluster_spec, sys; print('torch' in sys.modules, 'ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_shipped_cluster_files_load():
    local = load_cluster(None)
    assert local.label_key == DEFAULT_LABEL_KEY
    assert {n.kind: n.role for n in local.nodes} == {"head": "none", "cpu-highmem": "attention",
                                                      "gpu": "experts", "cpu": "any"}
    hetero = load_cluster(CLUSTERS_DIR / "example-hetero.yaml")
    assert hetero.kind("gpu").count == 2 and hetero.kind("gpu").device == "cuda"
    assert hetero.kind("cpu-highmem").memory_bytes == 64 * GiB


def test_json_description_and_defaults(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"nodes": [{"kind": "n1", "memory_gb": 2}]}))
    spec = load_cluster(path)
    (n1,) = spec.nodes
    assert (n1.count, n1.speed, n1.device, n1.role, n1.resources) == (1, 1.0, "cpu", "any", {})
    assert spec.label_key == DEFAULT_LABEL_KEY and spec.source == str(path)


@pytest.mark.parametrize("text, expected", [
    ("nodes:\n  - {kind: a, memory_gb: 1, memroy: 2}\n", "nodes[0] (a): unknown key 'memroy'"),
    ("nodez: []\n", "unknown key 'nodez'"),
    ("nodes:\n  - {kind: a, memory_gb: 1, device: tpu}\n", "nodes[0] (a): device must be one of cpu, cuda, got 'tpu'"),
    ("nodes:\n  - {kind: a, memory_gb: 1}\n  - {kind: a, memory_gb: 2}\n", "nodes[1]: duplicate kind 'a'"),
    ("nodes:\n  - {kind: a, memory_gb: 1, count: 0}\n", "count must be an integer >= 1"),
    ("nodes:\n  - {kind: a, memory_gb: -1}\n", "memory_gb must be a number > 0"),
    ("nodes:\n  - {kind: a, memory_gb: 1, speed: 0}\n", "speed must be a number > 0"),
    ("nodes:\n  - {kind: a, memory_gb: 1, role: boss}\n", "role must be one of"),
    ("nodes:\n  - {kind: a}\n", "missing required key 'memory_gb'"),
    ("nodes:\n  - {kind: 'a b', memory_gb: 1}\n", "kind must be a label value"),
    ("nodes:\n  - {kind: a, memory_gb: 1, resources: {x: 0}}\n", "resources: 'x'"),
    ("nodes: [\n", "cannot parse"),
    ("nodes: []\n", "at least one node kind"),
])
def test_bad_cluster_file_names_file_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ClusterSpecError) as err:
        load_cluster(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ClusterSpecError, match="nope.yaml: cluster description not found"):
        load_cluster(tmp_path / "nope.yaml")


def test_roles_labels_and_actor_options():
    c = cluster(node("head", 1024, role="none"), node("mem", 4096, role="attention", resources={"mem_node": 1}),
                node("gpu", 2048, role="experts", count=2, device="cuda"), label_key="example.com/pool")
    fp = footprint()
    p = plan(fp, c)
    assert [(w.kind, w.node_index) for w in p.attention_workers] == [("mem", 0)]
    assert sorted((s.kind, s.node_index) for s in p.expert_shards) == [("gpu", 0), ("gpu", 1)]
    assert {n.kind: n.actors for n in p.nodes}["head"] == ()
    assert p.actor_options("attn-0") == {"label_selector": {"example.com/pool": "mem"}, "resources": {"mem_node": 1}}
    assert p.actor_options("shard-1") == {"label_selector": {"example.com/pool": "gpu"}}
    with pytest.raises(ValueError, match="no actor 'shard-9'"):
        p.actor_options("shard-9")
    assert_every_expert_once(p, fp)
    assert_within_budgets(p, fp)


def test_attention_prefers_attention_role_then_largest_any_node():
    fp = footprint(dense_mib=100)
    c = cluster(node("small", 1024), node("large", 4096), node("mem", 150, role="attention"))
    p = plan(fp, c, PlannerConfig(num_attention_workers=3, kv_cache_tokens=0))
    # mem holds one worker (100 of 150 MiB); then `any` nodes, the larger first, spreading
    assert [(w.name, w.kind) for w in p.attention_workers] == [("attn-0", "mem"), ("attn-1", "large"),
                                                               ("attn-2", "small")]
    assert all(s.kind in ("small", "large") for s in p.expert_shards)


def test_node_with_role_any_hosts_attention_and_experts_within_one_budget():
    fp = footprint(layers=2, experts=8, expert_mib=1, dense_mib=20, kv_per_token=MiB)
    c = cluster(node("both", 40, role="any"), node("exp", 1024, role="experts"))
    p = plan(fp, c, PlannerConfig(kv_cache_tokens=4))  # attention reserves 24 MiB of both[0]'s 40
    both = next(s for s in p.expert_shards if s.kind == "both")
    assert p.attention_workers[0].kind == "both" and p.attention_workers[0].bytes == 24 * MiB
    assert both.num_experts <= 16  # the 16 MiB left
    assert_every_expert_once(p, fp)
    assert_within_budgets(p, fp)


def test_load_is_proportional_to_speed():
    fp = footprint(layers=3, experts=60, expert_mib=1, dense_mib=1)
    c = cluster(node("attn", 1024, role="attention"), node("fast", 1024, role="experts", speed=2.0),
                node("slow", 1024, role="experts", speed=1.0))
    p = plan(fp, c)
    fast, slow = sorted(p.expert_shards, key=lambda s: -s.speed)
    assert fast.kind == "fast"
    for layer in fp.moe_layers:
        assert len(fast.experts[layer]) == 40 and len(slow.experts[layer]) == 20
    assert fast.load_share == pytest.approx(2 * slow.load_share)
    assert max(p.layer_imbalance.values()) == pytest.approx(1.0) and not p.warnings


def test_expected_load_balances_hot_experts():
    fp = footprint(layers=2, experts=16, expert_mib=1, dense_mib=1)
    load = {(layer, e): (9.0 if e in (3, 11) else 1.0) for layer in range(2) for e in range(16)}
    c = cluster(node("attn", 1024, role="attention"), node("gpu", 1024, role="experts", count=2))
    p = plan(fp, c, PlannerConfig(expert_load=load))
    loads = {layer: [load[layer, e] for e in range(16)] for layer in range(2)}
    per_shard = layer_loads(p, loads)
    for layer in range(2):
        assert per_shard[0][layer] == per_shard[1][layer] == 16.0  # 32 in all, split evenly
        assert p.shard_of(layer, 3) != p.shard_of(layer, 11)  # the two hot experts apart
    assert_every_expert_once(p, fp)


def test_expert_load_outside_the_model_is_refused():
    with pytest.raises(PlacementError, match=r"\(5, 0\)"):
        plan(footprint(layers=2), cluster(node("a", 1024)), PlannerConfig(expert_load={(5, 0): 1.0}))


def test_memory_limited_fast_node_is_filled_but_never_overfilled():
    fp = footprint(layers=3, experts=8, expert_mib=1, dense_mib=1)
    c = cluster(node("attn", 1024, role="attention"), node("fast", 6, role="experts", speed=8.0),
                node("slow", 1024, role="experts", speed=1.0))
    p = plan(fp, c)
    fast = next(s for s in p.expert_shards if s.kind == "fast")
    assert [len(fast.experts[layer]) for layer in range(3)] == [2, 2, 2]  # 6 MiB spread over the layers
    assert_within_budgets(p, fp)
    assert_every_expert_once(p, fp)
    assert any("memory limits" in w for w in p.warnings)


def test_insufficient_expert_memory_is_refused_with_the_shortfall():
    fp = footprint(layers=2, experts=8, expert_mib=1)  # experts need 16 MiB
    c = cluster(node("attn", 1024, role="attention"), node("gpu", 5, role="experts", count=2))
    with pytest.raises(PlacementError) as err:
        plan(fp, c)
    msg = str(err.value)
    assert "experts need 16.00 MiB" in msg and "10.00 MiB free" in msg
    assert f"short by 6.00 MiB ({6 * MiB} bytes)" in msg and "gpu[0], gpu[1]" in msg


def test_attention_that_does_not_fit_is_refused_with_the_shortfall():
    fp = footprint(dense_mib=100, kv_per_token=MiB)
    c = cluster(node("mem", 120, role="attention"), node("gpu", 1024, role="experts"))
    with pytest.raises(PlacementError) as err:
        plan(fp, c, PlannerConfig(kv_cache_tokens=30))  # needs 130 MiB
    msg = str(err.value)
    assert "attn-0 needs 130.00 MiB" in msg and f"short by 10.00 MiB ({10 * MiB} bytes)" in msg and "mem[0]" in msg


@pytest.mark.parametrize("roles, missing", [(("experts", "none"), "attention workers"),
                                            (("attention", "none"), "expert shards")])
def test_cluster_without_eligible_nodes_is_refused(roles, missing):
    c = cluster(*(node(f"k{i}", 1024, role=r) for i, r in enumerate(roles)))
    with pytest.raises(PlacementError, match=f"no node can host {missing}"):
        plan(footprint(), c)


def test_more_shards_than_nodes_share_nodes_and_their_speed():
    fp = footprint(layers=1, experts=12, dense_mib=1)
    c = cluster(node("attn", 1024, role="attention"), node("fast", 1024, role="experts", speed=2.0),
                node("slow", 1024, role="experts", speed=1.0))
    p = plan(fp, c, PlannerConfig(num_expert_shards=3))
    assert [(s.name, s.kind, s.speed) for s in p.expert_shards] == [
        ("shard-0", "fast", 1.0), ("shard-1", "slow", 1.0), ("shard-2", "fast", 1.0)]
    assert [s.num_experts for s in p.expert_shards] == [4, 4, 4]
    assert {n.kind: n.actors for n in p.nodes}["fast"] == ("shard-0", "shard-2")


def test_explicit_assignment_is_used_and_validated():
    fp = footprint(layers=2, experts=4, expert_mib=1, dense_mib=1)
    c = cluster(node("attn", 1024, role="attention"), node("gpu", 4, role="experts", count=2))
    given = {0: [[0, 1], [2, 3]], 1: [[3, 1], [0, 2]]}
    p = plan(fp, c, assignment=given)
    assert [s.experts for s in p.expert_shards] == [{0: (0, 1), 1: (1, 3)}, {0: (2, 3), 1: (0, 2)}]
    bad = [({0: [[0, 1], [2, 3]]}, "cover exactly the MoE layers"),
           ({0: [[0, 1, 2, 3]], 1: [[0, 1, 2, 3]]}, "1 groups for 2 shards"),
           ({0: [[0, 1], [1, 3]], 1: [[0, 1], [2, 3]]}, "exactly once"),
           ({0: [[0, 1, 2], [3]], 1: [[0, 1], [2, 3]]}, "short by 1.00 MiB")]  # 5 experts on a 4 MiB node
    for assignment, expected in bad:
        with pytest.raises(PlacementError, match=expected):
            plan(fp, c, assignment=assignment)


def test_plan_is_deterministic_json_and_described():
    fp = footprint(layers=3, experts=10, dense_mib=2)
    c = load_cluster(CLUSTERS_DIR / "example-hetero.yaml")
    first, second = plan(fp, c), plan(fp, c)
    assert json.dumps(first.to_dict()) == json.dumps(second.to_dict())
    data = json.loads(json.dumps(first.to_dict()))
    assert sorted(e for s in data["expert_shards"] for e in s["experts"]["1"]) == list(range(10))
    text = first.describe()
    for name in ("attn-0", "shard-0", "shard-1", "cpu-highmem[0]", "gpu[0]", "gpu[1]", "head[0]"):
        assert name in text
    assert sum(n["used_bytes"] for n in data["nodes"]) == fp.dense_bytes + 16384 * fp.kv_bytes_per_token + 30 * MiB


def test_config_validation():
    for kwargs in ({"num_attention_workers": 0}, {"num_expert_shards": 0}, {"kv_cache_tokens": -1},
                   {"max_load_ratio": 0.5}, {"expert_load": {(0, 0): -1.0}}):
        with pytest.raises(ValueError):
            PlannerConfig(**kwargs)
    with pytest.raises(ValueError):
        ModelFootprint((0, 0), 8, 1, 1, 1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(layers=st.integers(1, 4), experts=st.integers(1, 12),
       budgets=st.lists(st.integers(0, 30), min_size=1, max_size=4),
       speeds=st.lists(st.sampled_from([0.5, 1.0, 3.0]), min_size=4, max_size=4))
def test_plans_exactly_when_experts_fit(layers, experts, budgets, speeds):
    fp = footprint(layers=layers, experts=experts, expert_mib=1, dense_mib=1)
    nodes = [node("attn", 1024, role="attention")]
    nodes += [node(f"e{i}", b + 0.5, role="experts", speed=speeds[i]) for i, b in enumerate(budgets)]
    fits = sum(budgets) >= layers * experts  # node i holds b whole experts
    try:
        p = plan(fp, cluster(*nodes))
    except PlacementError as err:
        assert not fits and "short by" in str(err)
        return
    assert fits
    assert_every_expert_once(p, fp)
    assert_within_budgets(p, fp)


def _safetensors_bytes(model_dir: Path) -> tuple[int, int]:
    """(dense, routed-expert) tensor bytes, read from the safetensors headers."""
    dense = routed = 0
    for f in model_dir.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                size = meta["data_offsets"][1] - meta["data_offsets"][0]
                routed += size if ".experts." in name else 0
                dense += 0 if ".experts." in name else size
    return dense, routed


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_footprint_matches_checkpoint_bytes(tiny_model, family):
    model_dir = tiny_model(family)
    fp = footprint_of(load_spec(model_dir), "float32")
    assert (fp.dense_bytes, fp.total_expert_bytes) == _safetensors_bytes(model_dir)
    half = footprint_of(load_spec(model_dir), "bfloat16")
    assert 2 * half.dense_bytes == fp.dense_bytes and 2 * half.expert_bytes == fp.expert_bytes


def test_run_plan_on_tiny_model(tiny_model):
    model_dir = tiny_model("olmoe")
    text = run_plan(str(model_dir), None, False)
    for name in ("attn-0", "shard-0", "shard-1", "cpu-highmem[0]"):
        assert name in text
    data = json.loads(run_plan(str(model_dir), str(CLUSTERS_DIR / "example-hetero.yaml"), True))
    assert [w["kind"] for w in data["attention_workers"]] == ["cpu-highmem"]
    assert {s["kind"] for s in data["expert_shards"]} == {"gpu"}
    spec = load_spec(model_dir)
    for layer in spec.moe_layers:
        owned = sorted(e for s in data["expert_shards"] for e in s["experts"][str(layer)])
        assert owned == list(range(spec.num_experts))

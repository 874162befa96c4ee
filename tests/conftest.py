"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from experts.tiny import make_tiny

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, dtype="float32", **overrides) -> directory, cached per argument set."""
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: str = "float32", shards: int = 1, **overrides) -> Path:
        key = (family, dtype, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{dtype}")
            cache[key] = make_tiny(family, out, dtype=dtype, shards=shards, **overrides)
        return cache[key]

    return get


NODE_LABEL = "moe-serve/node-kind"
TEST_NODES = {  # kind -> extra node args; the head node has kind "head" and runs nothing heavy
    "cpu-highmem": {"resources": {"cpu_highmem": 4}},
    "gpu": {"resources": {"fake_gpu": 4}},
    "cpu": {},
}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local multi-node Ray cluster per test session (ray.cluster_utils.Cluster), connected.

    Nodes carry the label `moe-serve/node-kind` = head | cpu-highmem | gpu | cpu (the "gpu" node is a
    CPU process with a `fake_gpu` resource: the machine has no GPU)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "labels": {NODE_LABEL: "head"}, "include_dashboard": False})
    for kind, args in TEST_NODES.items():
        cluster.add_node(num_cpus=4, labels={NODE_LABEL: kind}, **args)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()

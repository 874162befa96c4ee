"""Starting the engine's model on Ray: join or start a cluster, describe it, plan, start actors."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import ray

from cluster.actors import ActorConfig
from cluster.cluster_spec import CLUSTERS_DIR, DEFAULT_LABEL_KEY, ClusterSpec, cluster_from_dict, load_cluster
from cluster.config import EngineConfig, expert_cache_config
from cluster.placement import PlacementPlan, PlannerConfig, plan
from cluster.plan_cli import footprint_of
from cluster.ray_model import RayModel
from cluster.ray_model_config import RayModelConfig
from experts.config import load_spec
from router.shuffle import ShuffleConfig

log = logging.getLogger(__name__)
LOCAL_KIND = "local"
UNLABELED = "unlabeled"


def start_ray_model(config: EngineConfig) -> RayModel:
    connect(config.address)
    spec = load_spec(Path(config.model))
    cluster = resolve_cluster(config.cluster) if config.cluster else cluster_from_ray()
    placement = plan(footprint_of(spec, config.dtype), cluster, PlannerConfig(
        num_attention_workers=config.num_attention_workers, num_expert_shards=config.num_expert_shards,
        kv_cache_tokens=config.kv_cache_tokens))
    if config.show_progress:
        print(placement.describe(), file=sys.stderr, flush=True)
    problems = unschedulable(_UnlabeledAware(placement), ray.nodes())
    if problems:
        raise ValueError(f"{cluster.source}: the Ray cluster cannot host this plan: {'; '.join(problems)}")
    actor = ActorConfig(model=str(Path(config.model).resolve()), dtype=config.dtype, device=config.device,
                        kernel_backend=config.kernel_backend, num_threads=config.actor_threads,
                        transport_timeout_s=config.transport_timeout_s, transport=config.transport,
                        expert_cache=expert_cache_config(config))
    shuffle = ShuffleConfig(max_load_ratio=config.shuffle_max_load) if config.request_shuffling else None
    return RayModel(spec, RayModelConfig(
        actor=actor, plan=_UnlabeledAware(placement), num_kv_slots=config.num_blocks * config.block_size,
        block_size=config.block_size, microbatches=config.microbatches,
        min_microbatch_tokens=config.min_microbatch_tokens, replan_every_steps=config.replan_every_steps,
        shuffle=shuffle, replicas_per_layer=config.expert_replicas))


def connect(address: str | None) -> None:
    """Join `address`, else the cluster this process already belongs to, else start a local one
    whose single node carries the label kind "local"."""
    if ray.is_initialized():
        return
    if address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level="WARNING")
        return
    start_local()


def start_local(**options) -> None:
    """A new single-node Ray cluster on this machine, labelled kind "local", with at least 8 logical
    CPUs: every actor reserves one (the attention workers, the expert shards, a Serve replica), and a
    2-core machine would otherwise leave some of them pending forever."""
    log.info("starting a local Ray cluster")
    ray.init(address="local", labels={DEFAULT_LABEL_KEY: LOCAL_KIND}, num_cpus=max(os.cpu_count() or 1, 8),
             logging_level="WARNING", **{"include_dashboard": False, **options})


def resolve_cluster(name_or_path: str) -> ClusterSpec:
    """A cluster description file, or the name of a built-in one (cluster/clusters/NAME.yaml)."""
    path = Path(name_or_path)
    builtin = CLUSTERS_DIR / f"{name_or_path}.yaml"
    if not path.is_file() and builtin.is_file():
        path = builtin
    return load_cluster(path)


def cluster_from_ray(label_key: str = DEFAULT_LABEL_KEY) -> ClusterSpec:
    """Describe the live cluster: one node kind per value of `label_key` (nodes without the label
    form the kind "unlabeled"; a kind "head" runs nothing when other kinds exist)."""
    kinds: dict[str, list[dict]] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            kinds.setdefault(node.get("Labels", {}).get(label_key, UNLABELED), []).append(node)
    entries = []
    for kind, nodes in sorted(kinds.items()):
        res = nodes[0].get("Resources", {})
        entries.append({"kind": kind, "count": len(nodes), "device": "cuda" if res.get("GPU") else "cpu",
                        "memory_gb": max(res.get("memory", 1 << 30) / (1 << 30), 0.01),
                        "role": "none" if kind == "head" and len(kinds) > 1 else "any"})
    return cluster_from_dict({"label_key": label_key, "nodes": entries}, source="the live Ray cluster")


def unschedulable(placement, nodes: list[dict]) -> list[str]:
    """For each actor no alive node can take (label selector and custom resources, as Ray would
    match them), a line saying what it needs and which node kinds the cluster has."""
    alive = [n for n in nodes if n.get("Alive")]
    problems = []
    for actor in (*placement.attention_workers, *placement.expert_shards):
        opts = placement.actor_options(actor.name)
        labels, resources = opts.get("label_selector", {}), opts.get("resources", {})
        if any(all(n.get("Labels", {}).get(k) == v for k, v in labels.items())
               and all(n.get("Resources", {}).get(r, 0) >= amount for r, amount in resources.items()) for n in alive):
            continue
        kinds = sorted({n.get("Labels", {}).get(placement.label_key, UNLABELED) for n in alive})
        need = ", ".join([f"label {k}={v}" for k, v in labels.items()]
                         + [f"resource {r}>={a}" for r, a in resources.items()])
        problems.append(f"{actor.name} needs a node with {need or 'any resources'} "
                        f"(node kinds here: {', '.join(kinds)})")
    return problems


class _UnlabeledAware:
    """A plan whose actor options drop the label selector for the synthetic kind "unlabeled"."""

    def __init__(self, placement: PlacementPlan) -> None:
        self._plan = placement

    def __getattr__(self, name: str):
        return getattr(self._plan, name)

    def actor_options(self, name: str) -> dict:
        options = self._plan.actor_options(name)
        if options.get("label_selector", {}).get(self._plan.label_key) == UNLABELED:
            options.pop("label_selector")
        return options

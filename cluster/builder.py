"""The one place where the cluster's plain classes become Ray actors, with the plan's placement."""

from __future__ import annotations

import ray

from cluster.actors import ActorConfig, AttentionActor
from cluster.shard_actor import ShardActor


def _options(placement_options: dict, cfg: ActorConfig, name: str) -> dict:
    """Plan options (label_selector / resources) + CPUs; restarts are the engine's job: it
    recreates a dead actor itself and rebuilds the data plane around it."""
    return {"num_cpus": cfg.num_threads, **placement_options, "max_restarts": 0, "name": name}


def start_attention(placement_options: dict, cfg: ActorConfig, name: str, num_kv_slots: int):
    cls = ray.remote(AttentionActor).options(**_options(placement_options, cfg, name))
    return cls.remote(cfg, num_kv_slots)


def start_shard(placement_options: dict, cfg: ActorConfig, name: str,
                experts: dict[int, tuple[int, ...]]):
    cls = ray.remote(ShardActor).options(**_options(placement_options, cfg, name))
    return cls.remote(cfg, experts)

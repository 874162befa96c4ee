"""The engine's command-line flags, shared by `moe-serve generate`, `up` and `grpc` (cluster/cli.py)."""

from __future__ import annotations

import argparse

from cluster.config import BACKENDS, DTYPES, ENGINES, TRANSPORTS
from experts.cache_policy import ONLINE_POLICIES
from experts.cost_model import SCHEDULES

def engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by `generate`, `up` and `grpc`. Each one's dest is its EngineConfig field and its
    default None, so a flag not given leaves EngineConfig's own default (one default per setting)."""
    p.add_argument("--dtype", choices=DTYPES, help=_default("dtype"))
    p.add_argument("--device", help=_default("device"))
    p.add_argument("--kernel-backend", choices=BACKENDS, help=_default("kernel_backend"))
    p.add_argument("--max-model-len", type=int,
                   help="default: the model's max_position_embeddings, at most --kv-cache-tokens")
    p.add_argument("--kv-cache-tokens", type=int, help="KV-cache budget in tokens, over all sequences; "
                   + _default("kv_cache_tokens"))
    p.add_argument("--max-num-seqs", type=int, help="sequences in the running batch at most; "
                   + _default("max_num_seqs"))
    p.add_argument("--enable-prefix-caching", action="store_true", default=None,
                   help="reuse the K/V of prompt blocks earlier requests computed (shared system prompts, "
                        "multi-turn chat); each attention worker caches its own")
    p.add_argument("--num-speculative-tokens", type=int, metavar="K",
                   help="speculative decoding by prompt lookup: up to K draft tokens per step, checked in the same "
                        "forward pass (greedy and seeded outputs do not change); "
                        + _default("num_speculative_tokens"))
    p.add_argument("--prompt-lookup-max", type=int, metavar="N",
                   help="longest n-gram of the output's end looked up in the text for drafts; "
                        + _default("prompt_lookup_max"))
    p.add_argument("--prompt-lookup-min", type=int, metavar="N",
                   help="shortest such n-gram; " + _default("prompt_lookup_min"))
    p.add_argument("--route-prediction", action="store_true", default=None,
                   help="run the route predictors live; their recall goes to the metrics (generate: and is "
                        "printed at the end)")
    p.add_argument("--expert-cache", type=float, metavar="FRACTION", dest="expert_cache_fraction",
                   help="keep only this fraction of each layer's experts resident, moving the rest in from the slow "
                        "tier on demand (with --engine ray: of each expert shard's experts)")
    p.add_argument("--expert-cache-policy", choices=ONLINE_POLICIES, help=_default("expert_cache_policy"))
    p.add_argument("--expert-cache-prefetch", action="store_true", default=None,
                   help="load the experts pre-gating predicts for the next layer ahead of it")
    p.add_argument("--expert-cache-schedule", choices=SCHEDULES,
                   help="where missing experts compute: auto (the calibrated cost model decides per expert), "
                        "load (every miss is loaded), cpu (every miss is computed where it lies); "
                        + _default("expert_cache_schedule"))
    p.add_argument("--engine", choices=ENGINES,
                   help="inprocess: one process; ray: attention workers and expert shards as Ray actors; "
                        + _default("engine"))
    p.add_argument("--cluster", help="(ray) cluster description file or built-in name (local, "
                   "example-hetero); default: described from the live Ray nodes")
    p.add_argument("--expert-shards", type=int, metavar="N", dest="num_expert_shards",
                   help="(ray) number of expert shards; default: one per node that may host experts")
    p.add_argument("--attention-workers", type=int, metavar="N", dest="num_attention_workers",
                   help="(ray) number of attention workers; " + _default("num_attention_workers"))
    p.add_argument("--replan-every", type=int, metavar="STEPS", dest="replan_every_steps",
                   help="(ray) re-plan expert placement from live routing every STEPS engine steps")
    p.add_argument("--expert-replicas", type=int, metavar="N",
                   help="(ray, with --replan-every) at each re-plan, copy to each node the N remote experts per "
                        "layer its sequences use most; " + _default("expert_replicas"))
    p.add_argument("--shuffle-requests", action="store_true", default=None, dest="request_shuffling",
                   help="(ray) move each sequence, KV cache and all, to the attention worker on the node of the "
                        "expert shards its tokens are predicted to reach")
    p.add_argument("--shuffle-max-load", type=float, metavar="RATIO",
                   help="(ray, with --shuffle-requests) keep every attention worker at most RATIO x the mean number "
                        "of sequences; higher lets more sequences sit beside their experts and unbalances attention; "
                        + _default("shuffle_max_load"))
    p.add_argument("--microbatches", type=int, choices=(1, 2),
                   help="(ray) ping-pong micro-batches per attention worker (1 = off); " + _default("microbatches"))
    p.add_argument("--transport", choices=TRANSPORTS,
                   help="(ray) the data plane between actors: tcp (sockets driven by the waiting thread) or gloo; "
                        + _default("transport"))


ENGINE_FLAGS = ("dtype", "device", "kernel_backend", "max_model_len", "kv_cache_tokens", "max_num_seqs",
                "enable_prefix_caching", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                "route_prediction", "expert_cache_fraction", "expert_cache_policy",
                "expert_cache_prefetch", "expert_cache_schedule", "engine", "cluster", "num_expert_shards",
                "num_attention_workers", "replan_every_steps", "expert_replicas", "request_shuffling",
                "shuffle_max_load", "microbatches", "transport")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig fields the command line set (the dest of each flag of engine_args)."""
    return {name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None}


def _default(field: str) -> str:
    from dataclasses import fields

    from cluster.config import EngineConfig

    return f"default: {next(f.default for f in fields(EngineConfig) if f.name == field)}"

"""Live speculation on the demo model: cross-node bytes with request shuffling and expert grouping.

A local Ray cluster of two nodes (ray.cluster_utils.Cluster, labels node-a and node-b), each running
one attention worker and one expert shard, serves the trained demo model. Greedy completions of a
fit set of prompts run first, on the planner's placement, while the attention workers count
co-activation and inter-layer transitions. Then one held-out set of prompts runs four times:

- `off`: the planner's placement, each sequence on attention worker seq_id mod 2 (no speculation);
- `shuffling`: the same placement, sequences moved (KV copied) toward the shards their tokens are
  predicted to reach (router/shuffle.py);
- `grouping`: experts re-placed by the speculative grouping fitted on the fit set's routing;
- `grouping+shuffling`: both;
- `grouping+shuffling+1 replica(s)`: both, and each node also holds copies of the remote experts its
  sequences used most on a second pass over the fit prompts (`--replicas` per layer; they cost
  expert memory: `replicas` / `experts` in the output).

Reported per run: cross-node bytes per generated token from the data plane's counters (dispatch,
combine) and the driver's (migrate: KV copied across nodes), sequences moved, the shards' load
(token-expert assignments each served, max/mean: over all MoE layers, as `moe-serve replay` reports
it, and at the worst one), and whether the tokens equal
those of the `off` run (they must). Prints one JSON object.
`--more-fit` adds 16 prompts to the 8 of the fit set, to see how much the result owes to the fit set.
`--shuffle-max-load` sets how unbalanced shuffling may leave the attention workers (default 1.25).
Usage: python bench/shuffle_live.py [--max-tokens 96] [--more-fit] [--shuffle-max-load 1.25]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster_engine import LABEL, start_cluster  # bench/cluster_engine.py, beside this file
from placement_live import FIT, HELD_OUT  # bench/placement_live.py, beside this file
from router.grouping import max_over_mean
from router.replicas import shard_loads
from router.shuffle import RequestShuffler, ShuffleConfig

MORE_FIT = ["def main():\n", "class Error(Exception):\n", "from collections import", "    def close(self):\n",
            "if not isinstance(", "for key, value in", "import logging\n", "def test_", "    return self.",
            "elif ", "lines = []\n", "print(", "with self.", "assert ", "class Base(object):\n", "except KeyError:\n"]

CLUSTER_YAML = f"""
label_key: {LABEL}
nodes:
  - {{kind: head, memory_gb: 1, role: none}}
  - {{kind: node-a, memory_gb: 4, role: any}}
  - {{kind: node-b, memory_gb: 4, role: any}}
"""


def run(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> dict:
    rm = engine.model
    t = rm.traffic
    before = (t.dispatch_bytes, t.combine_bytes, t.migrate_bytes, t.sequences_moved)
    counts_before = copy.deepcopy(rm.worker_expert_totals)
    outs = [o.token_ids for o in engine.generate(prompts, params)]
    tokens = sum(len(o) for o in outs)
    d, c, m, moved = (after - b for after, b in zip((t.dispatch_bytes, t.combine_bytes, t.migrate_bytes,
                                                     t.sequences_moved), before))
    counts = [{layer: [a - b for a, b in zip(row, was.get(layer, [0] * len(row)))] for layer, row in now.items()}
              for now, was in zip(rm.worker_expert_totals, counts_before)]
    loads = shard_loads(rm.owner, rm.replicas, rm.local_shards(), counts, len(rm.shards))
    per_layer = np.stack(list(loads.values()))  # [L, S]
    return {"bytes_per_token": {"dispatch": round(d / tokens), "combine": round(c / tokens),
                                "migrate": round(m / tokens), "total": round((d + c + m) / tokens)},
            "sequences_moved": moved, "tokens": outs,
            "shard_load_max_over_mean": round(float(max_over_mean(per_layer.sum(axis=0, keepdims=True))[0]), 3),
            "shard_load_worst_layer": round(float(max(max_over_mean(per_layer))), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens generated per held-out prompt")
    ap.add_argument("--replicas", type=int, default=1, help="expert copies per layer and node in the last run")
    ap.add_argument("--more-fit", action="store_true", help=f"fit on {len(MORE_FIT)} more prompts as well")
    ap.add_argument("--shuffle-max-load", type=float, default=ShuffleConfig().max_load_ratio,
                    help="request shuffling keeps each attention worker at most this x the mean number of sequences")
    args = ap.parse_args()
    fit = FIT + MORE_FIT if args.more_fit else FIT
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    model = str(ensure_demo_model())
    cluster = start_cluster({"node-a": {}, "node-b": {}})
    runs: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "two-nodes.yaml"
            spec.write_text(CLUSTER_YAML)
            engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster=str(spec), num_attention_workers=2,
                                            num_expert_shards=2))
        rm = engine.model
        nodes = rm.topology.node_of
        colocated = nodes[0] != nodes[1] and sorted(nodes[:2]) == sorted(nodes[2:])
        run(engine, fit, params)
        owner = rm.planned_owner()  # from the fit prompts' routing only
        shuffler = RequestShuffler(ShuffleConfig(max_load_ratio=args.shuffle_max_load))
        for name, grouped, shuffled in (("off", False, False), ("shuffling", False, True),
                                        ("grouping", True, False), ("grouping+shuffling", True, True)):
            if grouped and rm.owner != {layer: tuple(o) for layer, o in owner.items()}:
                runs["moves"] = rm.move_experts(owner)
            rm.shuffler = shuffler if shuffled else None
            runs[name] = run(engine, HELD_OUT, params)
        # Replicas: the fit prompts again, now gathered by node, tell each node which remote experts
        # its sequences use most; one copy per layer and node.
        rm.planned_replicas(0)  # discards the per-worker statistics of the runs above
        run(engine, fit, params)
        runs["replicas"] = rm.replicate_experts(args.replicas)
        runs[f"grouping+shuffling+{args.replicas} replica(s)"] = run(engine, HELD_OUT, params)
        engine.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    off = runs["off"]["bytes_per_token"]["total"]
    out = {"model": model, "attention_workers": 2, "expert_shards": 2, "colocated": colocated,
           "fit_prompts": len(fit), "held_out_prompts": len(HELD_OUT), "shuffle_max_load": args.shuffle_max_load,
           "max_tokens": args.max_tokens, "expert_moves": runs.pop("moves", None),
           "replicas": runs.pop("replicas"), "experts": rm.spec.num_experts * len(rm.spec.moe_layers)}
    for name, r in runs.items():
        out[name] = {"bytes_per_token": r["bytes_per_token"], "sequences_moved": r["sequences_moved"],
                     "shard_load_max_over_mean": r["shard_load_max_over_mean"],
                     "shard_load_worst_layer": r["shard_load_worst_layer"],
                     "reduction": round(1 - r["bytes_per_token"]["total"] / off, 4),
                     "identical_tokens": r["tokens"] == runs["off"]["tokens"]}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cluster engine against the in-process engine, on the decode benchmark's model.

A local multi-node Ray cluster (ray.cluster_utils.Cluster: nodes labelled cpu-highmem, gpu, cpu)
runs 1 attention worker (cpu-highmem) and 2 expert shards (gpu, cpu); measured in one run:
- per-layer dispatch + combine latency at batch 8, without pipelining: the attention worker's time
  from sending a layer's tokens to holding every shard's outputs, minus the slowest shard's expert
  compute for that layer (`layer_latency_ms_p50`; `layer_round_trip_ms_p50` keeps the compute);
- decode tokens/s at batch 8 of the cluster engine over the in-process engine: with the engine's
  defaults (`vs_inprocess_b8`: ping-pong on, but a batch is split only when each micro-batch gets
  >= min_microbatch_tokens, which a batch of 8 decodes does not), with ping-pong off, and with
  ping-pong forced (min_microbatch_tokens=1), and the forced pipelining's speedup; each cluster run
  alternates with an in-process run (`--repeats` pairs per variant) and a ratio is the median of
  the paired ratios (`vs_inprocess_b8_range`: their range), because a shared VM's speed drifts;
- cross-node bytes per generated token (dispatch, combine) from the data plane's counters.
Prints one JSON object. Usage: python bench/cluster_engine.py [--batch 8] [--new-tokens 24] [--repeats 3]
[--transport tcp|gloo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from decode import bench_model, prompts  # bench/decode.py, beside this file

LABEL = "moe-serve/node-kind"
NODES = {"cpu-highmem": {"cpu_highmem": 4}, "gpu": {"fake_gpu": 4}, "cpu": {}}


def start_cluster(nodes: dict[str, dict] = NODES) -> Cluster:
    """A local Ray cluster: a head and one node of each kind (label -> custom resources), 4 CPUs each."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "labels": {LABEL: "head"}, "include_dashboard": False})
    for kind, resources in nodes.items():
        cluster.add_node(num_cpus=4, labels={LABEL: kind}, resources=resources)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


def decode(engine: LLMEngine, batch: int, new_tokens: int, on_step=None) -> float:
    """Decode tokens/s of `batch` requests (prefill excluded); `on_step()` after each decode step."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    for p in prompts(batch):
        engine.add_request(p, params)
    while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.seqs.values()):
        engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if on_step is not None:
            on_step()
    return batch * steps / (time.perf_counter() - start)


def layer_latencies(model) -> tuple[list[float], list[float]]:
    """From the last step: per MoE layer (round trip, round trip - slowest shard's compute) in ms."""
    step = model.last_step
    trips, comm = [], []
    for layer, rts in step["round_trip_ms"][0].items():
        compute = max(s["compute_ms"].get(layer, 0.0) for s in step["shard_traffic"])
        trips.append(sum(rts))
        comm.append(sum(rts) - compute)
    return trips, comm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MOE_SERVE_BENCH_CACHE", "/tmp/moe-serve-bench")))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="alternating cluster / in-process runs per variant")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "gloo"), help="the cluster's data plane")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="in-process engine threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = str(bench_model(args.cache, args.dtype))
    base = dict(model=model, dtype=args.dtype, kv_cache_tokens=4096, max_num_seqs=args.batch)

    inproc = LLMEngine(EngineConfig(**base))
    decode(inproc, args.batch, 4)  # warm-up

    cluster = start_cluster()
    variants = {"default": {}, "no_pipelining": {"microbatches": 1}, "forced_pipelining": {"min_microbatch_tokens": 1}}
    try:
        results = {name: run_variant(base, extra, args, inproc) for name, extra in variants.items()}
    finally:
        ray.shutdown()
        cluster.shutdown()
    default, forced, off = results["default"], results["forced_pipelining"], results["no_pipelining"]
    inproc_tps = statistics.median(t for r in results.values() for t in r["inprocess"])
    print(json.dumps({
        "model": model, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens,
        "transport": args.transport,
        "layer_latency_ms_p50": round(statistics.median(off["comm"]), 3),
        "layer_round_trip_ms_p50": round(statistics.median(off["trips"]), 3),
        "vs_inprocess_b8": round(default["vs_inprocess"], 3),
        "vs_inprocess_b8_range": [round(r, 3) for r in default["vs_inprocess_range"]],
        "vs_inprocess_b8_no_pipelining": round(off["vs_inprocess"], 3),
        "vs_inprocess_b8_forced_pipelining": round(forced["vs_inprocess"], 3),
        "pipelining_speedup_forced": round(forced["vs_inprocess"] / off["vs_inprocess"], 3),
        "default_splits_batch": default["split"],
        "tokens_per_s": {"inprocess": round(inproc_tps, 2),
                         **{k: round(v["tokens_per_s"], 2) for k, v in results.items()}},
        "cross_node_bytes_per_token": {"dispatch": round(off["dispatch_per_token"]),
                                       "combine": round(off["combine_per_token"])},
    }, indent=2))
    return 0


def run_variant(base: dict, extra: dict, args, inproc: LLMEngine) -> dict:
    """Decode tokens/s, per-layer latencies and bytes per token of the cluster engine with `extra`
    settings; its runs alternate with the in-process engine's (`--repeats` pairs), and the ratio is the
    median of the paired ratios, so that the VM's drifting speed stays out of it."""
    engine = LLMEngine(EngineConfig(**base, engine="ray", cluster="local", transport=args.transport, **extra))
    try:
        decode(engine, args.batch, 16)  # warm-up: first calls, allocations, connections
        trips, comm, ours, theirs = [], [], [], []
        traffic0 = (engine.model.traffic.dispatch_bytes, engine.model.traffic.combine_bytes)

        def record(model=engine.model):
            t, c = layer_latencies(model)
            trips.extend(t)
            comm.extend(c)

        for _ in range(args.repeats):
            theirs.append(decode(inproc, args.batch, args.new_tokens))
            ours.append(decode(engine, args.batch, args.new_tokens, record))
        tokens = args.repeats * args.batch * args.new_tokens
        t = engine.model.traffic
        split = any(len(v) > 1 for v in engine.model.last_step["round_trip_ms"][0].values())
        ratios = [a / b for a, b in zip(ours, theirs)]
        return {"tokens_per_s": statistics.median(ours), "inprocess": theirs, "vs_inprocess": statistics.median(ratios),
                "vs_inprocess_range": [min(ratios), max(ratios)], "trips": trips, "comm": comm, "split": split,
                "dispatch_per_token": (t.dispatch_bytes - traffic0[0]) / tokens,
                "combine_per_token": (t.combine_bytes - traffic0[1]) / tokens}
    finally:
        engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())

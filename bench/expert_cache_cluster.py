"""The expert cache on the cluster: expert shards holding a fraction of their own experts resident.

A local multi-node Ray cluster (as bench/cluster_engine.py: attention worker on cpu-highmem, expert
shards on gpu and cpu) serves the demo model (or --model); measured in one run on the same prompts:
decode tokens/s of the Ray engine with every shard's experts resident, and with `--fraction` of
them under the score policy with the calibrated schedule, without and with pre-gating prefetch (the
attention worker sends each shard the next layer's predicted experts with the tokens; the shard
loads them while the attention worker attends); the shards' summed hit rate, CPU-computed experts,
bytes moved per token and prefetch accuracy; whether the greedy tokens are identical (they must
be). Prints one JSON object; `vs_all_resident` is tokens/s over the all-resident cluster's (the
prefetch variant's figures are under "prefetch").

    python bench/expert_cache_cluster.py [--fraction 0.5] [--batch 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import ray

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster_engine import start_cluster  # bench/cluster_engine.py, beside this file
from expert_cache import PROMPTS  # bench/expert_cache.py

COUNTED = ("hits", "misses", "loads", "cpu_computed", "bytes_moved", "prefetches", "prefetch_used")


def decode(engine: LLMEngine, batch: int, new_tokens: int) -> tuple[float, list[tuple[int, ...]], dict]:
    """(decode tokens/s after each request's first token, every request's tokens, summed cache stats)."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(PROMPTS[i % len(PROMPTS)], params) for i in range(batch)]
    final, totals = {}, dict.fromkeys(COUNTED, 0)

    def step() -> None:
        final.update({o.request_id: o for o in engine.step() if o.finished})
        cache = engine.model.step_stats().get("expert_cache", {})
        for k in COUNTED:
            totals[k] += cache.get(k, 0)

    while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.seqs.values()):
        step()
    start = time.perf_counter()
    while engine.has_unfinished():
        step()
    return batch * new_tokens / (time.perf_counter() - start), [final[i].token_ids for i in ids], totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model directory (default: the built-in demo model)")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of each shard's experts kept resident")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    model = str(args.model or ensure_demo_model())
    base = EngineConfig(model=model, engine="ray", cluster="local", max_num_seqs=args.batch)
    cluster = start_cluster()
    out: dict = {"model": model, "fraction": args.fraction, "batch": args.batch, "new_tokens": args.new_tokens}
    try:
        runs = {}
        for name, extra in (("all_resident", {}), ("score", {"expert_cache_fraction": args.fraction}),
                            ("prefetch", {"expert_cache_fraction": args.fraction, "expert_cache_prefetch": True})):
            engine = LLMEngine(replace(base, **extra))
            try:
                decode(engine, args.batch, 4)  # warm-up
                runs[name] = decode(engine, args.batch, args.new_tokens)
            finally:
                engine.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    tokens = args.batch * (args.new_tokens + 1)
    base_tps, want, _ = runs["all_resident"]

    def figures(tps: float, got: list, cache: dict) -> dict:
        looked_up = cache["hits"] + cache["misses"]
        return {"cached_tokens_per_s": tps, "vs_all_resident": tps / base_tps,
                "hit_rate": cache["hits"] / looked_up if looked_up else None,
                "cpu_computed_per_token": cache["cpu_computed"] / tokens,
                "bytes_moved_per_token": cache["bytes_moved"] / tokens,
                "prefetch_accuracy": cache["prefetch_used"] / cache["prefetches"] if cache["prefetches"] else None,
                "identical_tokens": got == want}

    out.update({"all_resident_tokens_per_s": base_tps, **figures(*runs["score"]),
                "prefetch": figures(*runs["prefetch"])})
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

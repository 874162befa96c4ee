"""Prefix caching on requests that share a system prompt: time to serve them with and without it.

On bench/decode.py's model (OLMoE-shaped, ~261M parameters, float32), `--requests` requests whose
prompts are one `--system`-token prefix plus a short question of their own, each generating
`--new-tokens` greedy tokens, in two arrival patterns:
  - turns: one request after another (each finished before the next arrives), as chat turns or
    agents sharing an instruction prompt do;
  - burst: all at once (in-process, the requests admitted in one step share the prefix blocks the
    first of them computes in that step).
Each pattern runs on an engine with prefix caching and one without, alternating (`--repeats`; the
cache is emptied before each run), with identical tokens required; prints one JSON object with the
median seconds and the speedup (`speedup_turns`, `speedup_burst`) and the share of prompt tokens
served from the cache. `--engine ray` runs the cluster engine on a local multi-node Ray cluster
(bench/cluster_engine.py's) with `--attention-workers` workers, each caching its own blocks.
Usage: python bench/prefix_cache.py [--system 512] [--requests 8] [--new-tokens 8] [--repeats 3]
       [--engine inprocess|ray] [--attention-workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from decode import add_cache_arg, bench_model  # bench/decode.py, beside this file


def workload(system: int, requests: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 256, (system,), generator=g).tolist()
    return [prefix + torch.randint(0, 256, (12,), generator=g).tolist() for _ in range(requests)]


def serve(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, turns: bool) -> tuple[float, list]:
    """Seconds to serve the prompts (one at a time, or all at once) and their tokens."""
    start = time.perf_counter()
    if turns:
        outs = [engine.generate([p], params)[0] for p in prompts]
    else:
        outs = engine.generate(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]


def run_pattern(engines: dict[str, LLMEngine], prompts, params, turns: bool, repeats: int) -> dict:
    """Alternating uncached / cached runs, each on an empty cache; -> the pattern's JSON entry."""
    seconds, hit, query = {"cached": [], "uncached": []}, 0, 0
    for _ in range(repeats):
        tokens = {}
        for name, engine in engines.items():
            engine.scheduler.blocks.clear_cache()  # a cold cache
            before = (engine.scheduler.prefix_hit_tokens, engine.scheduler.prefix_query_tokens)
            s, tokens[name] = serve(engine, prompts, params, turns)
            seconds[name].append(s)
            hit += engine.scheduler.prefix_hit_tokens - before[0]
            query += engine.scheduler.prefix_query_tokens - before[1]
        if tokens["cached"] != tokens["uncached"]:
            raise SystemExit(f"{'turns' if turns else 'burst'}: prefix caching changed the tokens")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"seconds": {k: round(v, 3) for k, v in med.items()}, "prompt_tokens_from_cache": round(hit / query, 3),
            "identical_tokens": True, "speedup": round(med["uncached"] / med["cached"], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", type=int, default=512, help="tokens of the shared prefix")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="inprocess", choices=("inprocess", "ray"))
    ap.add_argument("--attention-workers", type=int, default=2, help="with --engine ray")
    add_cache_arg(ap)
    args = ap.parse_args()
    if min(args.system, args.requests, args.new_tokens, args.repeats, args.attention_workers) <= 0:
        ap.error("--system, --requests, --new-tokens, --repeats and --attention-workers must be > 0")
    model = str(bench_model(args.cache, "float32"))
    prompts = workload(args.system, args.requests)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    kv = args.requests * (args.system + 12 + args.new_tokens + 16)
    out = {"model": model, "engine": args.engine, "system_tokens": args.system, "requests": args.requests,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads()}
    extra = {}
    if args.engine == "ray":
        from cluster_engine import start_cluster  # bench/cluster_engine.py, beside this file
        cluster = start_cluster()
        extra = {"engine": "ray", "cluster": "local", "num_attention_workers": args.attention_workers}
        out["attention_workers"] = args.attention_workers
    engines = {name: LLMEngine(EngineConfig(model=model, kv_cache_tokens=kv, enable_prefix_caching=caching, **extra))
               for name, caching in (("uncached", False), ("cached", True))}
    try:
        serve(engines["uncached"], prompts[:1], params, True)  # warm-up: first calls, allocations
        for pattern, turns in (("turns", True), ("burst", False)):
            out[pattern] = run_pattern(engines, prompts, params, turns, args.repeats)
            out[f"speedup_{pattern}"] = out[pattern].pop("speedup")
    finally:
        for engine in engines.values():
            engine.shutdown()
        if args.engine == "ray":
            import ray
            ray.shutdown()
            cluster.shutdown()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

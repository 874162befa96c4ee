"""Speculative decoding by prompt lookup: decode tokens/s with drafts against without.

On the demo model (or `--model DIR`), in-process: the 8 held-out prompts of bench/placement_live.py,
`--max-tokens` greedy tokens each, one request at a time (batch 1) and all at once (batch 8). Each
batch size alternates an engine without speculation and one with `--k` draft tokens (`--repeats`
pairs); the speedup is the median of the paired ratios, and the tokens must be identical. Also
prints the share of drafts kept and the tokens each step gave per sequence on average. The output of
a model with random weights (`--model` bench/decode.py's) seldom repeats itself, so few drafts are
proposed: there the benchmark shows what the lookup costs. `--engine ray` runs both engines on a
local multi-node Ray cluster (bench/cluster_engine.py's: 1 attention worker, 2 expert shards), where
a step's fixed cost (a Ray call, a data-plane round trip per layer) is larger. `--temperature T`
(with `--top-p`) samples instead, seeded, so the tokens must still be identical.
Prints one JSON object. Usage: python bench/speculative.py [--k 4] [--max-tokens 96] [--repeats 3]
[--engine inprocess|ray] [--temperature 0.7 --top-p 0.95]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from placement_live import HELD_OUT  # bench/placement_live.py, beside this file


def timed(engine: LLMEngine, prompts: list[str], params: SamplingParams, batch: int) -> tuple[float, list]:
    """Tokens/s serving the prompts `batch` at a time, and their tokens."""
    start, outs = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i:i + batch], params)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / seconds, [o.token_ids for o in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory (default: the demo model)")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="inprocess", choices=("inprocess", "ray"))
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: seeded sampling")
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    if min(args.k, args.max_tokens, args.repeats) <= 0:
        ap.error("--k, --max-tokens and --repeats must be > 0")
    model = args.model or str(ensure_demo_model())
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=0 if args.temperature > 0 else None, ignore_eos=True)
    except ValueError as exc:
        ap.error(str(exc))
    extra, cluster = {}, None
    if args.engine == "ray":
        from cluster_engine import start_cluster  # bench/cluster_engine.py, beside this file
        cluster = start_cluster()
        extra = {"engine": "ray", "cluster": "local"}
    try:
        out = run(model, params, args, extra)
    finally:
        if cluster is not None:
            import ray
            ray.shutdown()
            cluster.shutdown()
    print(json.dumps(out, indent=2))
    return 0


def run(model: str, params: SamplingParams, args, extra: dict) -> dict:
    plain = LLMEngine(EngineConfig(model=model, **extra))
    spec = LLMEngine(EngineConfig(model=model, num_speculative_tokens=args.k, **extra))
    try:
        return compare(plain, spec, params, args, {"model": model, "engine": args.engine, "k": args.k,
                                                    "max_tokens": args.max_tokens, "prompts": len(HELD_OUT),
                                                    "temperature": args.temperature, "top_p": args.top_p,
                                                    "repeats": args.repeats})
    finally:
        plain.shutdown()
        spec.shutdown()


def compare(plain: LLMEngine, spec: LLMEngine, params: SamplingParams, args, out: dict) -> dict:
    """Alternating runs at batch 1 and batch 8; -> `out` with each batch size's entry."""
    timed(plain, HELD_OUT[:2], params, 2)  # warm-up
    timed(spec, HELD_OUT[:2], params, 2)
    for batch in (1, len(HELD_OUT)):
        pairs, drafted, kept = [], spec.num_draft_tokens, spec.num_accepted_tokens
        for _ in range(args.repeats):
            base, want = timed(plain, HELD_OUT, params, batch)
            fast, got = timed(spec, HELD_OUT, params, batch)
            if got != want:
                raise SystemExit(f"batch {batch}: speculation changed the tokens")
            pairs.append((base, fast))
        ratios = [f / b for b, f in pairs]
        drafted, kept = spec.num_draft_tokens - drafted, spec.num_accepted_tokens - kept
        tokens = args.repeats * len(HELD_OUT) * args.max_tokens
        out[f"b{batch}"] = {"tokens_per_s": {"plain": round(statistics.median(b for b, _ in pairs), 1),
                                             "speculative": round(statistics.median(f for _, f in pairs), 1)},
                            "speedup": round(statistics.median(ratios), 3),
                            "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
                            "drafts_kept": round(kept / drafted, 3) if drafted else None,
                            "tokens_per_sequence_step": round(tokens / (tokens - kept), 3),
                            "identical_tokens": True}
    return out


if __name__ == "__main__":
    sys.exit(main())

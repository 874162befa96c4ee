"""Decode with a fast-tier budget below the model: the live expert cache against all experts resident.

On the demo model (default) or --model, measured in one run on the same prompts: decode tokens/s
of the in-process engine with every expert resident, and with `--fraction` of each layer's
experts resident under each live policy (lru, lfu, score, adaptive) with the calibrated
intra-layer schedule, the score policy with pre-gating prefetch, LRU loading every miss on demand
(mixtral-offloading's baseline), and every missing expert computed on the CPU where it lies (the
fast tier left empty: all experts on the CPU, Fiddler's baseline); plus hit rate, demand misses, CPU-computed experts, prefetch accuracy
and bytes moved per token. Greedy tokens are checked to be identical.
Prints one JSON object; `vs_all_resident` is tokens/s over the all-resident engine's, and
`vs_lru_on_demand` over LRU-on-demand's.

    python bench/expert_cache.py [--fraction 0.5] [--batch 4] [--new-tokens 128] [--device cuda --fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams

VARIANTS = [  # (name, policy, prefetch, schedule)
    ("lru", "lru", False, "auto"), ("lfu", "lfu", False, "auto"), ("score", "score", False, "auto"),
    ("adaptive", "adaptive", False, "auto"), ("score+prefetch", "score", True, "auto"),
    ("lru-on-demand", "lru", False, "load"), ("all-on-cpu", "score", False, "cpu")]
PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Parser:\n    def __init__(self", "for i in range(",
           "    return self.", "with open(path) as f:\n", "try:\n    import", "if __name__ == '__main__':\n"]


def decode(engine: LLMEngine, batch: int, new_tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    """(decode tokens/s after each request's first token, every request's tokens)."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(PROMPTS[i % len(PROMPTS)], params) for i in range(batch)]
    final = {}
    while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.seqs.values()):
        final.update({o.request_id: o for o in engine.step() if o.finished})
    start = time.perf_counter()
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return batch * new_tokens / (time.perf_counter() - start), [final[i].token_ids for i in ids]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model directory (default: the built-in demo model)")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of each layer's experts kept resident")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", help="the fast tier's device (cuda: pinned host memory below it)")
    args = ap.parse_args()
    model = str(args.model or ensure_demo_model())
    base = EngineConfig(model=model, dtype=args.dtype, device=args.device, max_num_seqs=args.batch)
    out: dict = {"model": model, "fraction": args.fraction, "batch": args.batch, "new_tokens": args.new_tokens,
                 "threads": torch.get_num_threads()}
    decode(LLMEngine(base), args.batch, 8)  # warm-up: first-call allocations, oneDNN primitives
    resident_tps, want = decode(LLMEngine(base), args.batch, args.new_tokens)
    out["all_resident_tokens_per_s"] = resident_tps
    for name, policy, prefetch, schedule in VARIANTS:
        engine = LLMEngine(replace(base, expert_cache_fraction=args.fraction, expert_cache_policy=policy,
                                   expert_cache_prefetch=prefetch, expert_cache_schedule=schedule))
        out.setdefault("cost_model", engine.model.experts.cost.as_dict())
        tps, got = decode(engine, args.batch, args.new_tokens)
        stats = engine.model.experts.stats.as_dict()
        tokens = args.batch * (args.new_tokens + 1)
        out[name] = {"tokens_per_s": tps, "vs_all_resident": tps / resident_tps, "hit_rate": stats["hit_rate"],
                     "demand_misses_per_token": stats["misses"] / tokens, "prefetch_accuracy": stats["prefetch_accuracy"],
                     "cpu_computed_per_token": stats["cpu_computed"] / tokens,
                     "bytes_moved_per_token": stats["bytes_moved"] / tokens, "identical_tokens": got == want,
                     "fast_tier_bytes": engine.model.experts.nbytes()}
    for name, *_ in VARIANTS:
        out[name]["vs_lru_on_demand"] = out[name]["tokens_per_s"] / out["lru-on-demand"]["tokens_per_s"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode with a fast-tier budget below the model: the live expert cache against all experts resident.

On the demo model (default) or --model, measured in one run on the same prompts: decode tokens/s
of the in-process engine with every expert resident, and with `--fraction` of each layer's
experts resident under each live policy (lru, lfu, score, adaptive) with the calibrated
intra-layer schedule, the score policy with pre-gating prefetch, LRU loading every miss on demand
(mixtral-offloading's baseline), and every missing expert computed on the CPU where it lies (the
fast tier left empty: all experts on the CPU, Fiddler's baseline); plus hit rate, demand misses, CPU-computed experts, prefetch accuracy
and bytes moved per token. Greedy tokens are checked to be identical.
Prints one JSON object; `vs_all_resident` is tokens/s over the all-resident engine's, and
`vs_lru_on_demand` over LRU-on-demand's. The engines run in `--repeats` rounds: in each, every
variant decodes on a fresh engine right after the all-resident engine decodes the same prompts, and
its ratio is taken against that run; the median over the rounds is reported with its range, since
a shared VM's speed drifts.

    python bench/expert_cache.py [--fraction 0.5] [--batch 4] [--new-tokens 128] [--repeats 3] [--device cuda --fraction 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams

from engine_timing import decode_after_prefill  # bench/engine_timing.py, beside this file

VARIANTS = [  # (name, policy, prefetch, schedule)
    ("lru", "lru", False, "auto"), ("lfu", "lfu", False, "auto"), ("score", "score", False, "auto"),
    ("adaptive", "adaptive", False, "auto"), ("score+prefetch", "score", True, "auto"),
    ("lru-on-demand", "lru", False, "load"), ("all-on-cpu", "score", False, "cpu")]
PROMPTS = ["def main():\n", "import os\nimport sys\n", "class Parser:\n    def __init__(self", "for i in range(",
           "    return self.", "with open(path) as f:\n", "try:\n    import", "if __name__ == '__main__':\n"]


def decode(engine: LLMEngine, batch: int, new_tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    """(decode tokens/s after each request's first token, every request's tokens)."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    seconds, tokens = decode_after_prefill(engine, [engine.add_request(PROMPTS[i % len(PROMPTS)], params)
                                                    for i in range(batch)])
    return batch * new_tokens / seconds, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF model directory (default: the built-in demo model)")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of each layer's experts kept resident")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", help="the fast tier's device (cuda: pinned host memory below it)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds; each runs every variant on a fresh engine, right after the all-resident one")
    args = ap.parse_args()
    if min(args.repeats, args.batch, args.new_tokens) <= 0:
        ap.error("--repeats, --batch and --new-tokens must be > 0")
    if not 0.0 < args.fraction <= 1.0:
        ap.error(f"--fraction must be in (0, 1], got {args.fraction}")
    model = str(args.model or ensure_demo_model())
    base = EngineConfig(model=model, dtype=args.dtype, device=args.device, max_num_seqs=args.batch)
    out: dict = {"model": model, "fraction": args.fraction, "batch": args.batch, "new_tokens": args.new_tokens,
                 "threads": torch.get_num_threads(), "repeats": args.repeats}
    resident_engine = LLMEngine(base)
    decode(resident_engine, args.batch, 8)  # warm-up: first-call allocations, oneDNN primitives
    runs: dict[str, list[dict]] = {name: [] for name, *_ in VARIANTS}
    resident: list[float] = []
    for _ in tqdm(range(args.repeats), desc="rounds", file=sys.stderr):
        for name, policy, prefetch, schedule in VARIANTS:
            resident_tps, want = decode(resident_engine, args.batch, args.new_tokens)  # beside each variant
            resident.append(resident_tps)
            engine = LLMEngine(replace(base, expert_cache_fraction=args.fraction, expert_cache_policy=policy,
                                       expert_cache_prefetch=prefetch, expert_cache_schedule=schedule))
            out.setdefault("cost_model", engine.model.experts.cost.as_dict())
            tps, got = decode(engine, args.batch, args.new_tokens)
            runs[name].append(variant_report(engine, args, tps, resident_tps, got == want))
    out["all_resident_tokens_per_s"] = statistics.median(resident)
    for name, *_ in VARIANTS:
        out[name] = summarise(runs[name], runs["lru-on-demand"])
    print(json.dumps(out, indent=2))
    return 0


def variant_report(engine: LLMEngine, args: argparse.Namespace, tps: float, resident_tps: float,
                   identical: bool) -> dict:
    stats = engine.model.experts.stats.as_dict()
    tokens = args.batch * (args.new_tokens + 1)
    return {"tokens_per_s": tps, "vs_all_resident": tps / resident_tps, "hit_rate": stats["hit_rate"],
            "demand_misses_per_token": stats["misses"] / tokens, "prefetch_accuracy": stats["prefetch_accuracy"],
            "cpu_computed_per_token": stats["cpu_computed"] / tokens,
            "bytes_moved_per_token": stats["bytes_moved"] / tokens, "identical_tokens": identical,
            "fast_tier_bytes": engine.model.experts.nbytes()}


def _median_of_known(values) -> float | None:
    """The median of the values that are not None (prefetch accuracy is None in a round that
    prefetched nothing); None if none is known."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(runs: list[dict], on_demand: list[dict]) -> dict:
    """Medians over the rounds, with the ratios' ranges; tokens must be identical in every round.
    vs_lru_on_demand: the ratio of the two variants' vs_all_resident in the same round."""
    out = {key: _median_of_known(r[key] for r in runs) for key in runs[0] if key != "identical_tokens"}
    out["identical_tokens"] = all(r["identical_tokens"] for r in runs)
    out["vs_all_resident_range"] = [min(r["vs_all_resident"] for r in runs), max(r["vs_all_resident"] for r in runs)]
    paired = [r["vs_all_resident"] / d["vs_all_resident"] for r, d in zip(runs, on_demand)]
    out["vs_lru_on_demand"] = statistics.median(paired)
    out["vs_lru_on_demand_range"] = [min(paired), max(paired)]
    return out


if __name__ == "__main__":
    sys.exit(main())

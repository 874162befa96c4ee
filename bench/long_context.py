"""Decode with long contexts: attention over the keys where they lie against gathering them.

On the decode benchmark's model (bench/decode.py), `--batch` requests decode `--new-tokens` tokens
each (prefill excluded), once with each sequence attended in place (cluster/layers.py: the default
when the padded gather would be large and each sequence's keys sit in consecutive slots) and once
with every step's keys gathered into a batch padded to the longest context (the path small batches
take); the two alternate `--repeats` times and each ratio is the median of the pairs. Two cases:
every request with `--context` prompt tokens ("long"), and one such request beside `--batch` - 1
requests of 64 ("mixed"). Greedy tokens are compared. Prints one JSON object.

    python bench/long_context.py [--batch 8] [--context 1000] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import cluster.layers as layers
from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from decode import add_cache_arg, bench_model  # noqa: E402
from engine_timing import decode_after_prefill  # noqa: E402


def decode(engine: LLMEngine, contexts: list[int], new_tokens: int) -> tuple[float, list[tuple[int, ...]]]:
    """(decode tokens/s after each request's first token, every request's tokens)."""
    g = torch.Generator().manual_seed(sum(contexts))
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in contexts]
    seconds, tokens = decode_after_prefill(engine, [engine.add_request(p, params) for p in prompts])
    return len(contexts) * new_tokens / seconds, tokens


def compare(engine: LLMEngine, contexts: list[int], new_tokens: int, repeats: int) -> dict:
    """In place against gathered, alternating; medians, the ratio's range, whether tokens agree."""
    threshold = layers.GATHER_MAX_BYTES
    runs: dict[str, list[float]] = {"in_place": [], "gathered": []}
    tokens: dict[str, list] = {}
    try:
        for _ in tqdm(range(repeats), desc=f"{len(contexts)} requests, longest {max(contexts)}", file=sys.stderr):
            for name, limit in (("in_place", 0), ("gathered", float("inf"))):
                layers.GATHER_MAX_BYTES = limit
                tps, got = decode(engine, contexts, new_tokens)
                runs[name].append(tps)
                tokens.setdefault(name, got)
    finally:
        layers.GATHER_MAX_BYTES = threshold
    ratios = [a / b for a, b in zip(runs["in_place"], runs["gathered"])]
    return {"in_place_tokens_per_s": statistics.median(runs["in_place"]),
            "gathered_tokens_per_s": statistics.median(runs["gathered"]),
            "in_place_vs_gathered": statistics.median(ratios), "in_place_vs_gathered_range": [min(ratios), max(ratios)],
            "identical_tokens": tokens["in_place"] == tokens["gathered"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1000, help="prompt tokens of the long requests")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    add_cache_arg(ap)
    args = ap.parse_args()
    if min(args.batch, args.context, args.new_tokens, args.repeats) <= 0:
        ap.error("--batch, --context, --new-tokens and --repeats must be > 0")
    model = bench_model(args.cache, "float32")
    engine = LLMEngine(EngineConfig(model=str(model), max_num_seqs=args.batch,
                                    kv_cache_tokens=args.batch * (args.context + args.new_tokens + 16)))
    cases = {"long": [args.context] * args.batch, "mixed": [args.context] + [64] * (args.batch - 1)}
    out = {"model": str(model), "batch": args.batch, "context": args.context, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "threads": torch.get_num_threads()}
    for name, contexts in cases.items():
        out[name] = {"prompt_tokens": contexts} | compare(engine, contexts, args.new_tokens, args.repeats)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

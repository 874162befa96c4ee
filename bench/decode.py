"""Decode throughput against transformers, and batch-1 decode against the memory-bandwidth roofline.

On an OLMoE-shaped random model (~261M parameters: hidden 512, 8 layers, 32 experts, top-4),
measured in one run on the same model, dtype and inputs:
- decode tokens/s of moe-serve and of `transformers` `generate()` at batch 1, 8 and 32;
- batch-1 decode time as a fraction of the roofline: weight bytes read per token divided by the
  read bandwidth measured here on a buffer of the model's size;
- prefill of one `--prefill-tokens` prompt (time to the first token) against one `transformers`
  forward pass over it.
Decode time excludes prefill on both sides (time for N+1 new tokens minus time for 1).
The two engines run alternately, `--repeats` times per batch size, and each ratio is the median of
the paired ratios (with their range), and the bandwidth is probed right after each batch-1 run: a
shared VM's speed drifts between runs (the probe alone read 28-64 GB/s), and pairing keeps that
drift out of the ratios. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from experts.config import ModelSpec
from experts.tiny import make_tiny, olmoe_bench_config

from engine_timing import decode_after_prefill  # bench/engine_timing.py, beside this file

PROMPT_LEN = 32


def add_cache_arg(ap: argparse.ArgumentParser) -> None:
    """--cache: where the benchmark model is built and reused (MOE_SERVE_CACHE, else ~/.cache/moe-serve)."""
    cache = Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache/moe-serve"))
    ap.add_argument("--cache", type=Path, default=cache, help="where bench/decode.py's model is built (and reused)")


def bench_model(cache: Path, dtype: str) -> Path:
    path = cache / f"bench-olmoe-250m-{dtype}"
    if not (path / "config.json").is_file():
        print(f"building benchmark model in {path}", file=sys.stderr)
        make_tiny("olmoe", path, dtype=dtype, **olmoe_bench_config())
    return path


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, PROMPT_LEN), generator=g).tolist()


def ours_decode_seconds(engine: LLMEngine, batch: int, new_tokens: int) -> float:
    """Seconds for `new_tokens` decode steps of `batch` requests (prefill excluded)."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    return decode_after_prefill(engine, [engine.add_request(p, params) for p in prompts(batch)])[0]


def ours_prefill_seconds(engine: LLMEngine, tokens: list[int]) -> float:
    """Seconds from adding a `len(tokens)`-token request to its first (only) token."""
    start = time.perf_counter()
    engine.add_request(tokens, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def hf_prefill_seconds(model, tokens: list[int]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(torch.tensor([tokens]))
        return time.perf_counter() - start


def prefill_runs(engine: LLMEngine, hf, tokens: int, repeats: int) -> list[tuple[float, float]]:
    """(ours, transformers) seconds to prefill one `tokens`-token prompt, alternating, after a warm-up."""
    prompt = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    ours_prefill_seconds(engine, prompt)  # warm-up
    hf_prefill_seconds(hf, prompt)
    runs = [(ours_prefill_seconds(engine, prompt), hf_prefill_seconds(hf, prompt)) for _ in range(repeats)]
    print(f"prefill of {tokens} tokens: moe-serve {statistics.median(o for o, _ in runs):.3f} s, transformers "
          f"{statistics.median(h for _, h in runs):.3f} s", file=sys.stderr)
    return runs


def hf_decode_seconds(model, batch: int, new_tokens: int) -> float:
    ids = torch.tensor(prompts(batch))
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    with torch.inference_mode():
        return min(run(new_tokens + 1) for _ in range(2)) - min(run(1) for _ in range(2))


def weight_bytes_per_token(spec: ModelSpec, elem: int) -> int:
    """Bytes of weights one batch-1 decode step reads: attention, norms, routers, top-k experts, LM head."""
    h, d = spec.hidden_size, spec.head_dim
    attn = h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads) + 2 * h
    router = spec.num_experts * h
    experts = spec.top_k * spec.expert_numel
    per_layer = attn + router + experts
    return elem * (spec.num_layers * per_layer + spec.vocab_size * h + h + h)


def read_bandwidth(nbytes: int) -> float:
    """Bytes/s of reading a buffer of `nbytes` (best of several passes)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each engine per batch size")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill comparison")
    add_cache_arg(ap)
    args = ap.parse_args()
    if args.prefill_tokens < 1:
        ap.error(f"--prefill-tokens must be >= 1, got {args.prefill_tokens}")
    if min(args.new_tokens, args.repeats) < 1:
        ap.error(f"--new-tokens and --repeats must be >= 1, got {args.new_tokens} and {args.repeats}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1:
        ap.error(f"--batches must be >= 1 each, got {args.batches}")
    path = bench_model(args.cache, args.dtype)
    engine = LLMEngine(EngineConfig(model=str(path), dtype=args.dtype,
                                    kv_cache_tokens=max(max(batches) * 128, args.prefill_tokens + 16),
                                    max_num_seqs=max(batches)))
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    spec = engine.spec
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    per_token = weight_bytes_per_token(spec, elem)
    ours_tps, hf_tps, ratios, bandwidths, roofline = {}, {}, {}, [], []
    for b in batches:
        ours_decode_seconds(engine, b, 2)  # warm-up
        ours, hf_runs = [], []
        for _ in range(args.repeats):
            ours.append(b * args.new_tokens / ours_decode_seconds(engine, b, args.new_tokens))
            if b == 1:
                bandwidths.append(read_bandwidth(model_bytes))
                roofline.append((per_token / bandwidths[-1]) * ours[-1])
            hf_runs.append(b * args.new_tokens / hf_decode_seconds(hf, b, args.new_tokens))
        ours_tps[b], hf_tps[b] = statistics.median(ours), statistics.median(hf_runs)
        ratios[b] = [o / h for o, h in zip(ours, hf_runs)]
        print(f"batch {b}: moe-serve {ours_tps[b]:.1f} tok/s, transformers {hf_tps[b]:.1f} tok/s "
              f"(paired ratios {', '.join(f'{r:.2f}' for r in ratios[b])})", file=sys.stderr)
    prefill = prefill_runs(engine, hf, args.prefill_tokens, args.repeats)
    result = {
        "model": {"family": spec.family, "hidden": spec.hidden_size, "layers": spec.num_layers,
                  "experts": spec.num_experts, "top_k": spec.top_k, "dtype": args.dtype,
                  "weight_bytes": model_bytes},
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "tokens_per_s": {"moe_serve": ours_tps, "transformers": hf_tps},
        "vs_transformers": {b: statistics.median(r) for b, r in ratios.items()},
        "vs_transformers_range": {b: [min(r), max(r)] for b, r in ratios.items()},
        "weight_bytes_per_token_b1": per_token,
        "prefill_tokens": args.prefill_tokens,
        "prefill_s": {"moe_serve": statistics.median(o for o, _ in prefill),
                      "transformers": statistics.median(h for _, h in prefill)},
        "prefill_vs_transformers": statistics.median(h / o for o, h in prefill),
        "prefill_vs_transformers_range": [min(h / o for o, h in prefill), max(h / o for o, h in prefill)],
    }
    if 1 in batches:
        result["bandwidth_gb_s"] = statistics.median(bandwidths) / 1e9
        result["bandwidth_gb_s_range"] = [min(bandwidths) / 1e9, max(bandwidths) / 1e9]
        result["roofline_fraction_b1"] = statistics.median(roofline)
        result["roofline_fraction_b1_range"] = [min(roofline), max(roofline)]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

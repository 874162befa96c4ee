"""KV admission: whole reservations only (a request waits until prompt + max_tokens fit) against
partial admission with preemption (the default), on requests that ask for more tokens than fit.

Two parts, one JSON object:
  - `simulated`: the torch-free scheduler alone, tokens faked, counting engine steps to finish every
    request (fewer steps: more requests decode together), in scenarios of N requests of a 20-token
    prompt: all generating `max_tokens`, or asking for 800 and stopping (as at an eos) after 50-199;
  - `engine`: the demo model in-process, `--requests` greedy requests of `--new-tokens` tokens in a
    KV cache of `--kv-tokens`, decode tokens/s under each policy (identical tokens required).
Usage: python bench/kv_admission.py [--requests 16] [--new-tokens 200] [--kv-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster.scheduler import Scheduler, SchedulerConfig
from cluster.sequence import Sequence

SCENARIOS = {  # name -> (requests, KV blocks of 16 tokens, max_tokens, stop after (None: max_tokens))
    "16 x 200 tokens, 256 slots": (16, 16, 200, None),
    "32 x 200 tokens, 1024 slots": (32, 64, 200, None),
    "64 x 200 tokens, 1024 slots": (64, 64, 200, None),
    "32 asking 800, stopping at 50-199, 1024 slots": (32, 64, 800, lambda i: 50 + (i * 37) % 150),
    "64 asking 800, stopping at 50-199, 1024 slots": (64, 64, 800, lambda i: 50 + (i * 37) % 150),
}


def simulate(requests: int, blocks: int, max_tokens: int, stop_after, partial: bool) -> dict:
    s = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, block_size=16, num_blocks=blocks,
                                  max_model_len=1024, partial_admission=partial))
    for i in range(requests):
        s.add(Sequence(i, [1] * 20, max_tokens=max_tokens))
    steps = recomputed = 0
    while s.has_unfinished():
        out = s.schedule()
        recomputed += sum(len(c.token_ids) for c in out.chunks if c.start == 0 and len(c.token_ids) > 20)
        s.update(out, {c.seq_id: 7 for c in out.chunks if c.sample})
        steps += 1
        for q in list(s.running):
            if len(q.output_ids) >= (stop_after(q.seq_id) if stop_after else q.max_tokens):
                s.finish(q.seq_id, "stop")
    return {"steps": steps, "preemptions": s.num_preemptions, "tokens_recomputed": recomputed}


def engine_run(model: str, requests: int, new_tokens: int, kv_tokens: int, partial: bool) -> tuple[float, list, int]:
    engine = LLMEngine(EngineConfig(model=model, kv_cache_tokens=kv_tokens, max_num_seqs=requests))
    engine.scheduler = Scheduler(replace(engine.scheduler.config, partial_admission=partial))  # before any request
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [f"def function_{i}(x):" for i in range(requests)]
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return requests * new_tokens / seconds, [o.token_ids for o in outs], engine.scheduler.num_preemptions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--kv-tokens", type=int, default=1024)
    args = ap.parse_args()
    if min(args.requests, args.new_tokens, args.kv_tokens) <= 0:
        ap.error("--requests, --new-tokens and --kv-tokens must be > 0")
    out = {"simulated": {}}
    for name, scenario in SCENARIOS.items():
        whole, partial = simulate(*scenario, partial=False), simulate(*scenario, partial=True)
        out["simulated"][name] = {"whole": whole, "partial": partial,
                                  "steps_whole_over_partial": round(whole["steps"] / partial["steps"], 2)}
    model = str(ensure_demo_model())
    whole_tps, whole_tokens, _ = engine_run(model, args.requests, args.new_tokens, args.kv_tokens, False)
    partial_tps, partial_tokens, preempted = engine_run(model, args.requests, args.new_tokens, args.kv_tokens, True)
    out["engine"] = {"model": model, "requests": args.requests, "new_tokens": args.new_tokens,
                     "kv_tokens": args.kv_tokens, "tokens_per_s": {"whole": round(whole_tps, 1),
                                                                   "partial": round(partial_tps, 1)},
                     "partial_over_whole": round(partial_tps / whole_tps, 2), "preemptions": preempted,
                     "identical_tokens": whole_tokens == partial_tokens}
    print(json.dumps(out, indent=2))
    return 0 if whole_tokens == partial_tokens else 1


if __name__ == "__main__":
    sys.exit(main())

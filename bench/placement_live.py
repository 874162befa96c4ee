"""Live speculative expert grouping on the demo model: cross-node bytes before and after re-planning.

A local multi-node Ray cluster (as bench/cluster_engine.py: attention worker on cpu-highmem, expert
shards on gpu and cpu) serves the trained demo model. Greedy completions of one set of prompts
(the fit set) run on the planner's initial placement while the attention worker counts
co-activation and inter-layer transitions; the placement is re-planned from those counts and the
experts are moved between shards in service; then a different set of prompts (held out) runs on
both the old and the new placement. Reported: cross-node dispatch and combine bytes per generated
token on the held-out prompts with each placement, their reduction, the moves, and whether the
held-out tokens are identical (they must be). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import ray

from cluster.config import EngineConfig
from cluster.demo import ensure_demo_model
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from cluster_engine import start_cluster  # bench/cluster_engine.py, beside this file

FIT = ["class Server:\n", "def parse(argv):\n", "import os\nimport sys\n", "for i in range(10):\n",
       "with open(path) as f:\n", "try:\n    import json\n", "def __init__(self, name", "if __name__ == '__main__':\n"]
HELD_OUT = ["class Cache(dict):\n", "def read_lines(path):\n", "import re\n", "while True:\n",
            "def __repr__(self):\n", "raise ValueError(", "return [x for x in", "self.assertEqual("]
PARAMS = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def bytes_per_token(engine: LLMEngine, prompts: list[str]) -> tuple[float, float, list[tuple[int, ...]]]:
    t = engine.model.traffic
    d0, c0 = t.dispatch_bytes, t.combine_bytes
    outs = [o.token_ids for o in engine.generate(prompts, PARAMS)]
    tokens = sum(len(o) for o in outs)
    return (t.dispatch_bytes - d0) / tokens, (t.combine_bytes - c0) / tokens, outs


def main() -> int:
    model = str(ensure_demo_model())
    cluster = start_cluster()
    try:
        engine = LLMEngine(EngineConfig(model=model, engine="ray", cluster="local"))
        bytes_per_token(engine, FIT)
        owner = engine.model.planned_owner()  # from the fit prompts' routing only
        d_old, c_old, held_old = bytes_per_token(engine, HELD_OUT)
        moves = engine.model.move_experts(owner)
        d_new, c_new, held_new = bytes_per_token(engine, HELD_OUT)
        engine.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = {"model": model, "shards": 2, "moves": moves, "identical_tokens": held_old == held_new,
           "held_out_bytes_per_token": {"before": {"dispatch": round(d_old), "combine": round(c_old)},
                                        "after": {"dispatch": round(d_new), "combine": round(c_new)}},
           "dispatch_reduction": round(1 - d_new / d_old, 4),
           "cross_node_reduction": round(1 - (d_new + c_new) / (d_old + c_old), 4)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How predictable a routing trace's expert reuse is: a learned, free re-layout of the fast tier beside LRU and Belady.

The replay's setting (`moe-serve replay --cache-capacity C`): decode steps in position order, a fast
tier of round(C x layers x experts) experts over all layers, counters on the second half of the steps.
The re-layout pays nothing to change the tier: before each reported step it holds the experts most
likely to be used in that step, whatever it held before. Likelihoods are counted per class of
(layer, expert) in that step, with classes made of
- the expert's own history: used 1, 2 and 3 steps before, and in how many of the 4 before
  (`learned_history`);
- and also its layer and its rank among the layer's experts by inter-layer transition counts from
  the same step's route at the layer before (`learned_rich`; generous: a token's previous layer is
  known only when its layer runs, and here the tier is laid out for the whole step at once).
Both learn the transition counts and the likelihoods from the steps before each step (the warm-up
half first), as a policy could. An online policy that decides from these features has no more
information, and it pays a miss for every change to the tier. `in_sample_rich` counts both on the
reported steps themselves, which no policy can know: what memorising the reported routing buys.
The trace's LRU, score, adaptive and Belady hit rates come from the replay itself.
Prints one JSON object.

    python bench/cache_predictability.py [--trace ../shared/traces/mixtral-8x7b-humaneval.jsonl] [--capacity 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experts.cache_replay import DEFAULT_COST, ReplayPlan, make_policy, run_policy
from experts.cache_steps import Step, decode_steps
from router.traces import read_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-humaneval.jsonl"
HISTORY = 4  # steps of an expert's own history in its class
REPLAY_POLICIES = ("lru", "score", "adaptive", "belady")


def used(steps: list[Step], num_layers: int, num_experts: int) -> np.ndarray:
    """[S, L, E] bool: expert e of layer l is needed in step s."""
    out = np.zeros((len(steps), num_layers, num_experts), dtype=bool)
    for s, step in enumerate(steps):
        for layer, needs in enumerate(step.needs):
            out[s, layer, list(needs)] = True
    return out


def transition_ranks(use: np.ndarray, whole_trace: bool) -> np.ndarray:
    """[S, L, E]: rank (0 = most likely) of expert e at layer l by transition counts from step s's
    experts at layer l-1 (counted over the steps before s, or over the whole trace); 0 at layer 0."""
    u = use.astype(np.float64)
    per_step = np.einsum("sla,slb->slab", u[:, :-1], u[:, 1:])  # [S, L-1, E, E] layer l -> l+1
    if whole_trace:
        counts = np.broadcast_to(per_step.sum(0), per_step.shape)
    else:
        counts = np.cumsum(per_step, axis=0) - per_step  # the steps before s
    score = np.einsum("sla,slab->slb", u[:, :-1], counts)  # [S, L-1, E]
    ranks = np.zeros(use.shape, dtype=np.int64)
    ranks[:, 1:] = np.argsort(np.argsort(-score, axis=2, kind="stable"), axis=2, kind="stable")
    return ranks


def classes(use: np.ndarray, rich: bool, whole_trace: bool) -> tuple[np.ndarray, int]:
    """[S, L, E] class id of each (step, layer, expert) and the number of classes: its own history
    (used 1, 2, 3 steps before; uses in the 4 before), and with `rich` also its layer and transition rank."""
    s, layers, experts = use.shape
    past = np.zeros((HISTORY + 1, s, layers, experts), dtype=np.int64)  # past[d]: used d steps before
    for d in range(1, HISTORY + 1):
        past[d, d:] = use[:-d]
    fields, dims = [past[1], past[2], past[3], past[1:].sum(0)], [2, 2, 2, HISTORY + 1]
    if rich:
        fields += [np.broadcast_to(np.arange(layers)[None, :, None], use.shape), transition_ranks(use, whole_trace)]
        dims += [layers, experts]
    return np.ravel_multi_index(tuple(fields), tuple(dims)), int(np.prod(dims))


def relayout(use: np.ndarray, cls: np.ndarray, num_classes: int, first: int, capacity: int, online: bool) -> float:
    """Hit rate over steps first.. of a tier holding, each step, the `capacity` keys of highest
    likelihood; likelihoods from steps before each step (online) or from the reported steps (not)."""
    hits, seen = np.zeros(num_classes), np.zeros(num_classes)
    learn = range(HISTORY, first) if online else range(first, len(use))
    for s in learn:
        np.add.at(hits, cls[s].ravel(), use[s].ravel())
        np.add.at(seen, cls[s].ravel(), 1.0)
    got = needed = 0
    for s in range(first, len(use)):
        c, u = cls[s].ravel(), use[s].ravel()
        p = (hits[c] + 0.5) / (seen[c] + 1.0)
        kept = np.argsort(-p, kind="stable")[:capacity]
        got, needed = got + int(u[kept].sum()), needed + int(u.sum())
        if online:
            np.add.at(hits, c, u)
            np.add.at(seen, c, 1.0)
    return got / max(needed, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="routing trace (JSONL)")
    ap.add_argument("--capacity", type=float, default=0.25, help="fast tier, fraction of all experts")
    ap.add_argument("--fit-fraction", type=float, default=0.5, help="steps that only warm up, as in the replay")
    args = ap.parse_args()
    if not args.trace.is_file():
        ap.error(f"no trace at {args.trace}")
    if not 0.0 < args.capacity <= 1.0 or not 0.0 < args.fit_fraction < 1.0:
        ap.error(f"need 0 < --capacity <= 1 and 0 < --fit-fraction < 1, got {args.capacity} and {args.fit_fraction}")
    steps, layers, experts = decode_steps(read_trace(args.trace))
    capacity = max(1, round(args.capacity * layers * experts))
    first = int(len(steps) * args.fit_fraction)
    if not HISTORY <= first < len(steps):
        ap.error(f"the trace has {len(steps)} decode steps: too few to split at --fit-fraction {args.fit_fraction}")
    plan = ReplayPlan(steps, layers, experts, capacity, first, DEFAULT_COST)
    rates = {name: run_policy(plan, make_policy(name, plan), None).report(plan.cost)["hit_rate"]
             for name in REPLAY_POLICIES}
    use = used(steps, layers, experts)
    for name, rich, online in (("learned_history", False, True), ("learned_rich", True, True),
                               ("in_sample_rich", True, False)):
        cls, num_classes = classes(use, rich, whole_trace=not online)
        rates[name] = relayout(use, cls, num_classes, first, capacity, online)
    out = {"trace": str(args.trace), "capacity_experts": capacity, "experts": layers * experts,
           "reported_steps": len(steps) - first, "hit_rate": {k: round(v, 4) for k, v in rates.items()},
           "best_learned_minus_lru_points": round(100 * (max(rates["learned_history"], rates["learned_rich"])
                                                         - rates["lru"]), 2)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

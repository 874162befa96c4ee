"""Timing an engine's decode apart from its prefill, for the benchmarks beside this file."""

from __future__ import annotations

import time

from cluster.engine import LLMEngine


def decode_after_prefill(engine: LLMEngine, request_ids: list[str]) -> tuple[float, list[tuple[int, ...]]]:
    """Steps the engine through every request's prefill (which samples its first token), then times
    the rest: (decode seconds, each request's tokens, in `request_ids` order)."""
    final = {}
    while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.seqs.values()):
        final.update({o.request_id: o for o in engine.step() if o.finished})
    start = time.perf_counter()
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return time.perf_counter() - start, [final[i].token_ids for i in request_ids]

"""Serving metrics through Ray's metrics API (exported by Ray's metrics agent, Prometheus format).

Ray prefixes application metrics with ``ray_`` on export, so ``moe_time_to_first_token_seconds``
is scraped as ``ray_moe_time_to_first_token_seconds``. Every metric carries a ``model_name`` tag.
Outside a Ray worker (no ``ray.init``) ``ray.util.metrics`` records into a local registry that is
never exported, so the same code runs in-process; ``snapshot()`` mirrors the values for tests and
the ``/v1/stats`` route.

The MoE metrics are fed from the dict an engine step may leave in ``LLMEngine.last_step_stats``
(every key optional; values are for that one step):
    expert_tokens: {layer: [E] ints} or [L][E] ints (or anything with ``.tolist()``): tokens routed
        to (layer, expert)
    expert_load_imbalance: float; default from expert_tokens: mean over layers of max / mean
    cross_node_bytes: {direction: int}, e.g. {"dispatch": ..., "combine": ..., "migrate": ...}
    sequences_moved: int: sequences moved to another attention worker (request shuffling)
    route_prediction_recall: {distance (int, layers ahead): recall in [0, 1]}
    expert_cache_hit_rate: float in [0, 1]
    expert_cache: the step's CacheStats.as_dict(): hits, misses, bytes_moved, prefetches and
        prefetch_used feed counters; the prefetch-accuracy gauge is prefetch_used / prefetches so far
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Mapping

from ray.util.metrics import Counter, Gauge, Histogram

TTFT_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0]
TAG = ("model_name",)
EXPERT_FLUSH_STEPS = 16  # per-(layer, expert) counters reach Ray every this many steps, and when idle


class EngineMetrics:
    """Records one engine's metrics; call it from one thread (the engine thread)."""

    def __init__(self, model_name: str) -> None:
        tags = {"model_name": model_name}
        self.ttft = _histogram("moe_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS, tags)
        self.itl = _histogram("moe_inter_token_latency_seconds", "Time between output tokens.",
                              ITL_BUCKETS, tags)
        self.e2e = _histogram("moe_e2e_request_latency_seconds", "Request latency, arrival to finish.",
                              E2E_BUCKETS, tags)
        self.running = _gauge("moe_num_requests_running", "Requests being decoded or prefilled.", tags)
        self.waiting = _gauge("moe_num_requests_waiting", "Requests waiting for admission.", tags)
        self.kv_usage = _gauge("moe_kv_cache_usage_perc", "Fraction of KV-cache blocks in use.", tags)
        self.prompt_tokens = _counter("moe_prompt_tokens_total", "Prefilled prompt tokens.", tags)
        self.preemptions = _counter("moe_num_preemptions_total",
                                    "Requests preempted (blocks freed, recomputed later) for lack of KV cache.", tags)
        self.prefix_queries = _counter("moe_prefix_cache_queries_total",
                                       "Prompt tokens admitted with prefix caching on.", tags)
        self.prefix_hits = _counter("moe_prefix_cache_hits_total",
                                    "Prompt tokens whose K/V came from the prefix cache.", tags)
        self.generation_tokens = _counter("moe_generation_tokens_total", "Generated tokens.", tags)
        self.spec_drafts = _counter("moe_spec_decode_num_draft_tokens_total",
                                    "Draft tokens proposed by prompt lookup (speculative decoding).", tags)
        self.spec_accepted = _counter("moe_spec_decode_num_accepted_tokens_total",
                                      "Draft tokens the model's own tokens confirmed (kept).", tags)
        self.finished = _counter("moe_request_success_total", "Finished requests by finish reason.",
                                 tags, ("finished_reason",))
        self.expert_tokens = _counter("moe_expert_tokens_total", "Tokens routed to each expert.",
                                      tags, ("layer", "expert"))
        self.imbalance = _gauge("moe_expert_load_imbalance",
                                "Max over mean tokens per expert, averaged over MoE layers (1 = even).", tags)
        self.cross_node = _counter("moe_cross_node_bytes_total", "Bytes moved between nodes.",
                                   tags, ("direction",))
        self.moved = _counter("moe_sequences_moved_total",
                              "Sequences moved, KV cache and all, to another attention worker.", tags)
        self.recall = _gauge("moe_route_prediction_recall",
                             "Recall of predicted expert routes, by layers ahead.", tags, ("distance",))
        self.cache_hit = _gauge("moe_expert_cache_hit_rate", "Expert lookups served by the fast tier.", tags)
        self.cache_events = _counter("moe_expert_cache_events_total",
                                     "Expert-cache lookups by result (hit, miss) and experts loaded ahead "
                                     "(prefetch) or used after being loaded ahead (prefetch_used).", tags, ("event",))
        self.cache_bytes = _counter("moe_expert_cache_bytes_moved_total",
                                    "Bytes of experts moved into the fast tier.", tags)
        self.prefetch_accuracy = _gauge("moe_expert_cache_prefetch_accuracy",
                                        "Experts loaded ahead that were used before being evicted, over all "
                                        "loaded ahead so far.", tags)
        self.totals: Tally[str] = Tally()  # counter mirrors, name[/tag] -> total
        self._expert_pending: Tally[tuple[int, int]] = Tally()  # (layer, expert) -> tokens not yet in Ray
        self._steps_since_flush = 0
        self.gauges: dict[str, float] = {}  # gauge mirrors, name[/tag] -> last value

    # ---- per request ---------------------------------------------------------------------------
    def on_first_token(self, ttft_s: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self._inc(self.prompt_tokens, "prompt_tokens", num_prompt_tokens)
        self.totals["first_tokens"] += 1

    def on_token(self, num_tokens: int, gap_s: float | None) -> None:
        """`num_tokens` new tokens arrived `gap_s` after the previous ones (None: the first)."""
        self._inc(self.generation_tokens, "generation_tokens", num_tokens)
        if gap_s is not None and num_tokens > 0:
            for _ in range(num_tokens):
                self.itl.observe(gap_s / num_tokens)

    def on_finish(self, e2e_s: float, finish_reason: str) -> None:
        self.e2e.observe(e2e_s)
        self._inc(self.finished, f"finished/{finish_reason}", 1, {"finished_reason": finish_reason})

    # ---- per step ------------------------------------------------------------------------------
    def on_step(self, stats: Mapping[str, Any]) -> None:
        """Engine stats (running, waiting, kv_cache_usage; the running totals num_preemptions and, when
        on, prefix_cache_queries and prefix_cache_hits, spec_decode_draft_tokens and
        spec_decode_accepted_tokens) plus the optional MoE dict under "moe"."""
        self._set(self.running, "running", stats.get("running", 0))
        self._set(self.waiting, "waiting", stats.get("waiting", 0))
        self._set(self.kv_usage, "kv_cache_usage", stats.get("kv_cache_usage", 0.0))
        for metric, key in ((self.preemptions, "num_preemptions"), (self.prefix_queries, "prefix_cache_queries"),
                            (self.prefix_hits, "prefix_cache_hits"), (self.spec_drafts, "spec_decode_draft_tokens"),
                            (self.spec_accepted, "spec_decode_accepted_tokens")):
            if key in stats:  # running totals: count what is new
                self._inc(metric, key, stats[key] - self.totals[key])
        moe = stats.get("moe")
        if moe:
            self._on_moe(moe)
        self._steps_since_flush += 1
        if self._steps_since_flush >= EXPERT_FLUSH_STEPS or not stats.get("running", 0):
            self.flush_expert_tokens()

    def flush_expert_tokens(self) -> None:
        """One Ray counter update per (layer, expert) for the tokens counted since the last flush:
        per step it would cost one tagged update per expert of every MoE layer."""
        for (layer, expert), n in self._expert_pending.items():
            self.expert_tokens.inc(n, tags={"layer": str(layer), "expert": str(expert)})
        self._expert_pending.clear()
        self._steps_since_flush = 0

    def _on_moe(self, moe: Mapping[str, Any]) -> None:
        counts = moe.get("expert_tokens")
        if counts is not None:
            counts = counts.tolist() if hasattr(counts, "tolist") else counts
            self._expert_tokens(counts)
            imbalance = moe.get("expert_load_imbalance", load_imbalance(counts))
        else:
            imbalance = moe.get("expert_load_imbalance")
        if imbalance is not None:
            self._set(self.imbalance, "expert_load_imbalance", imbalance)
        for direction, n in (moe.get("cross_node_bytes") or {}).items():
            self._inc(self.cross_node, f"cross_node_bytes/{direction}", n, {"direction": str(direction)})
        self._inc(self.moved, "sequences_moved", moe.get("sequences_moved", 0))
        for distance, recall in (moe.get("route_prediction_recall") or {}).items():
            self._set(self.recall, f"route_prediction_recall/{distance}", recall, {"distance": str(distance)})
        if moe.get("expert_cache_hit_rate") is not None:
            self._set(self.cache_hit, "expert_cache_hit_rate", moe["expert_cache_hit_rate"])
        if moe.get("expert_cache"):
            self._expert_cache(moe["expert_cache"])

    def _expert_cache(self, cache: Mapping[str, Any]) -> None:
        for event, key in (("hit", "hits"), ("miss", "misses"), ("prefetch", "prefetches"),
                           ("prefetch_used", "prefetch_used")):
            self._inc(self.cache_events, f"expert_cache/{event}", cache.get(key, 0), {"event": event})
        self._inc(self.cache_bytes, "expert_cache_bytes_moved", cache.get("bytes_moved", 0))
        loaded_ahead = self.totals["expert_cache/prefetch"]
        if loaded_ahead:
            self._set(self.prefetch_accuracy, "expert_cache_prefetch_accuracy",
                      self.totals["expert_cache/prefetch_used"] / loaded_ahead)

    def _expert_tokens(self, counts: Mapping[int, list[int]] | list[list[int]]) -> None:
        for layer, row in _rows(counts):
            for expert, n in enumerate(row):
                if n > 0:
                    self._expert_pending[(layer, expert)] += n
                    self.totals[f"expert_tokens/{layer}/{expert}"] += n

    def snapshot(self) -> dict[str, float]:
        return {**self.totals, **self.gauges}

    def _inc(self, metric: Counter, key: str, value: float, tags: dict[str, str] | None = None) -> None:
        if value > 0:
            metric.inc(value, tags=tags)
            self.totals[key] += value

    def _set(self, metric: Gauge, key: str, value: float, tags: dict[str, str] | None = None) -> None:
        metric.set(float(value), tags=tags)
        self.gauges[key] = float(value)


def _rows(counts: Mapping[int, list[int]] | list[list[int]]):
    """(layer, [E] counts) pairs of a {layer: row} mapping or a [L][E] list."""
    return counts.items() if isinstance(counts, Mapping) else enumerate(counts)


def load_imbalance(counts: Mapping[int, list[int]] | list[list[int]]) -> float | None:
    """Mean over layers with routed tokens of max / mean tokens per expert (1.0 = perfectly even)."""
    ratios = [max(row) * len(row) / sum(row) for _, row in _rows(counts) if row and sum(row) > 0]
    return sum(ratios) / len(ratios) if ratios else None


def _histogram(name: str, doc: str, buckets: list[float], tags: dict[str, str]) -> Histogram:
    return Histogram(name, description=doc, boundaries=buckets, tag_keys=TAG).set_default_tags(tags)


def _gauge(name: str, doc: str, tags: dict[str, str], extra: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, description=doc, tag_keys=TAG + extra).set_default_tags(tags)


def _counter(name: str, doc: str, tags: dict[str, str], extra: tuple[str, ...] = ()) -> Counter:
    return Counter(name, description=doc, tag_keys=TAG + extra).set_default_tags(tags)

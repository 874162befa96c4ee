"""The replay's report (torch-free): per scheme, cross-node bytes per token (dispatch, combine, KV
replication, migration), loads and copies, the headline scheme, predictor recall, and a text summary.
router/replay.py's docstring states the cost model; ASSUMPTIONS repeats it in the report."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from router.grouping import GroupingConfig, Placement, align, group_experts, max_over_mean, moves
from router.predictors import RecallMeter
from router.stats import RouteTable, coactivation, popularity, transitions

if TYPE_CHECKING:
    from router.replay import ReplayConfig, Scheme


def _scheme_report(s: Scheme, tokens: int, config: ReplayConfig) -> dict[str, float]:
    vector = config.hidden_size * config.dtype_bytes
    kv = s.layer_visits * (config.nodes - 1) * config.kv_elems * config.dtype_bytes if s.mobile else 0
    per_layer = max_over_mean(s.expert_load)
    return {"dispatch_bytes_per_token": s.dispatch * vector / tokens,
            "combine_bytes_per_token": s.combine * vector / tokens,
            "dispatch_combine_bytes_per_token": (s.dispatch + s.combine) * vector / tokens,
            "kv_replication_bytes_per_token": kv / tokens,
            "migrate_bytes_per_token": s.migrate_bytes / tokens,
            "requests_moved": s.requests_moved,
            "cross_node_bytes_per_token": ((s.dispatch + s.combine) * vector + kv + s.migrate_bytes) / tokens,
            "local_dispatch_rate": s.local / max(s.layer_visits, 1),
            "replica_memory_overhead": (sum(len(ids) for r in s.replicas for ids in r.values())
                                        / s.placement.node_of.size if s.replicas is not None else 0.0),
            "max_over_mean_load": float(max_over_mean(s.expert_load.sum(axis=0, keepdims=True))[0]),
            "max_over_mean_load_per_layer_mean": float(per_layer.mean()),
            "max_over_mean_load_per_layer_worst": float(per_layer.max()),
            "attention_max_over_mean": float(max_over_mean(s.attention_load[None, :])[0])}


def _reduction(naive: float, other: float) -> float:
    return 1.0 - other / naive if naive > 0 else 0.0


ASSUMPTIONS = ("vector = hidden_size x dtype_bytes; dispatch: one vector from the attention node to each other node "
               "hosting >= 1 of the token's experts; combine: one vector from each expert node other than the node "
               "of the token's next layer (home after the last layer); pinned schemes attend on the request's home "
               "(round-robin by request); shuffling schemes attend where the prediction sent the token and replicate "
               "each token's K/V (kv_elems values per layer) to the other N-1 nodes, counted as kv bytes; request "
               "shuffling moves a request's home before a token, copying its K/V so far (migrate bytes)")


def report(table: RouteTable, fit: np.ndarray, schemes: list[Scheme], meters: dict[str, RecallMeter],
            grouped: dict[str, Placement], config: ReplayConfig) -> dict:
    tokens = int((~fit).sum())
    detail = {s.name: _scheme_report(s, tokens, config) for s in schemes}
    naive = detail["naive"]["cross_node_bytes_per_token"]
    for d in detail.values():
        d["reduction"] = _reduction(naive, d["cross_node_bytes_per_token"])
        d["dispatch_combine_reduction"] = _reduction(naive, d["dispatch_combine_bytes_per_token"])
    # the headline: the best scheme in the model's memory (copies are reported beside it)
    real = [s.name for s in schemes if s.name != "naive" and not s.oracle and s.replicas is None]
    best = min(real, key=lambda name: detail[name]["cross_node_bytes_per_token"])
    copied = [s.name for s in schemes if s.replicas is not None]
    refit = group_experts(popularity(table), coactivation(table), transitions(table),
                          GroupingConfig(config.nodes, config.max_load_ratio), start=grouped["mobile"])
    return {"naive_cross_node_bytes_per_token": naive,
            "speculative_scheme": best,
            "speculative_cross_node_bytes_per_token": detail[best]["cross_node_bytes_per_token"],
            "reduction": detail[best]["reduction"],
            "max_over_mean_load": detail[best]["max_over_mean_load"],
            "with_copies": {name: {k: detail[name][k] for k in ("reduction", "max_over_mean_load",
                                                               "replica_memory_overhead")} for name in copied},
            "schemes": detail,
            "predictor_recall": {name: m.as_dict() for name, m in meters.items()},
            "replan_moves": len(moves(grouped["mobile"], align(refit, grouped["mobile"]))),
            "trace": {"requests": len(table.requests), "tokens": table.num_tokens, "fit_tokens": int(fit.sum()),
                      "report_tokens": tokens, "layers": table.num_layers, "experts": table.num_experts,
                      "top_k": table.top_k},
            "assumptions": {"nodes": config.nodes, "hidden_size": config.hidden_size,
                            "dtype_bytes": config.dtype_bytes, "kv_elems": config.kv_elems,
                            "replicas_per_layer": config.replicas_per_layer,
                            "fit_fraction": config.fit_fraction, "cost_model": ASSUMPTIONS}}


def summary(report: dict) -> str:
    """A human-readable table of a replay_placement report."""
    a = report["assumptions"]
    lines = [f"replay: {report['trace']['report_tokens']} reported tokens on {a['nodes']} nodes "
             f"(hidden {a['hidden_size']} x {a['dtype_bytes']} B per vector)",
             f"{'scheme':42} {'bytes/token':>12} {'reduction':>9} {'max/mean load':>13} {'copies':>7}"]
    for name, s in report["schemes"].items():
        lines.append(f"{name:42} {s['cross_node_bytes_per_token']:12.0f} {s['reduction']:9.1%} "
                     f"{s['max_over_mean_load']:13.3f} {s['replica_memory_overhead']:7.1%}")
    lines.append("copies: expert memory added by the copies, as a share of the model's experts")
    for name, recall in report["predictor_recall"].items():
        lines.append(f"recall {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in recall.items()))
    return "\n".join(lines)

"""Request shuffling and expert copies in the placement replay (torch-free): what the shufflers
observe, and the copies fitted on the fit part (router/replay.py)."""

from __future__ import annotations

import numpy as np

from router.grouping import Placement
from router.replicas import Replicas, plan_replicas
from router.shuffle import Homes, RequestShuffler, ShuffleConfig, ShuffleGeometry
from router.stats import MISSING, RouteTable


def token_routes(table: RouteTable, t: int) -> list[tuple[int, tuple[int, ...]]]:
    """Token t's (layer, expert ids) at every layer it was routed."""
    return [(l, tuple(int(e) for e in row if e != MISSING)) for l, row in enumerate(table.experts[t])
            if row[0] != MISSING]


def node_hits(table: dict[int, tuple[int, ...]], routes: list[tuple[int, tuple[int, ...]]], nodes: int) -> np.ndarray:
    """[1, N]: at how many of the token's layers it reached each node; table: layer -> the node serving
    each expert for tokens attended where the token is (router/replicas.worker_tables)."""
    hits = np.zeros((1, nodes))
    for layer, ids in routes:
        hits[0, list({table[layer][e] for e in ids})] += 1
    return hits


def fit_replicas(fit: RouteTable, placement: Placement, per_layer: int, max_load_ratio: float) -> Replicas:
    """Copies for each node from the fit tokens of the requests homed there (request r on r mod N)."""
    nodes = placement.nodes
    counts = [{layer: np.zeros(fit.num_experts) for layer in range(fit.num_layers)} for _ in range(nodes)]
    for t in range(fit.num_tokens):
        for layer, ids in token_routes(fit, t):
            counts[int(fit.request_index[t]) % nodes][layer][list(ids)] += 1
    owner = {layer: tuple(int(n) for n in row) for layer, row in enumerate(placement.node_of)}
    return plan_replicas(owner, nodes, list(range(nodes)), counts, per_layer, max_load_ratio)


def make_homes(table: RouteTable, nodes: int, vector_bytes: int, kv_bytes_per_layer: int) -> Homes:
    """Request shuffling as the live engine runs it (its policy with the defaults, its bookkeeping);
    node n runs attention worker n and expert shard n."""
    names = tuple(str(n) for n in range(nodes))
    geometry = ShuffleGeometry(names, names, vector_bytes, table.num_layers * kv_bytes_per_layer)
    return Homes(nodes, geometry, RequestShuffler(ShuffleConfig()))

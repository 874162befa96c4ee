"""Request shuffling and expert copies in the placement replay (torch-free): where a token's experts
are served, what the shufflers observe, and the copies fitted on the fit part (router/replay.py)."""

from __future__ import annotations

import numpy as np

from router.grouping import Placement
from router.replicas import Replicas, plan_replicas
from router.shuffle import RequestShuffler, ShuffleConfig, ShuffleGeometry
from router.stats import MISSING, RouteTable


def token_routes(table: RouteTable, t: int) -> list[tuple[int, tuple[int, ...]]]:
    """Token t's (layer, expert ids) at every layer it was routed."""
    return [(l, tuple(int(e) for e in row if e != MISSING)) for l, row in enumerate(table.experts[t])
            if row[0] != MISSING]


def hosts(placement: Placement, replicas: Replicas | None, layer: int, ids: tuple[int, ...], at: int) -> list[int]:
    """The node serving each expert for a token attended on node `at` (a copy there, else the owner)."""
    own = placement.node_of[layer, list(ids)].tolist()
    if replicas is None:
        return own
    copies = replicas[at].get(layer, ())
    return [at if e in copies else n for e, n in zip(ids, own)]


def node_hits(placement: Placement, replicas: Replicas | None, routes: list[tuple[int, tuple[int, ...]]],
              at: int) -> np.ndarray:
    """[1, N]: at how many of the token's layers it reached each node."""
    hits = np.zeros((1, placement.nodes))
    for layer, ids in routes:
        hits[0, list(set(hosts(placement, replicas, layer, ids, at)))] += 1
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


def make_shuffler(table: RouteTable, nodes: int, vector_bytes: int, kv_bytes_per_layer: int) -> RequestShuffler:
    """The live policy with its defaults; node n runs attention worker n and expert shard n."""
    names = tuple(str(n) for n in range(nodes))
    geometry = ShuffleGeometry(names, names, vector_bytes, table.num_layers * kv_bytes_per_layer)
    return RequestShuffler(ShuffleConfig(), geometry)

"""Placement replay (torch-free): expert-parallel dispatch on N nodes, simulated over a recorded trace.

Cost model (every byte crossing a node boundary counts; `assumptions` in the report repeats it):

- N nodes, each running an attention worker and an expert shard. A "vector" is one token's hidden
  state: hidden_size x dtype_bytes bytes. A request's home node (round-robin by request) embeds its
  tokens and runs the LM head and sampler.
- At MoE layer l a token's attention runs on node a_l, its experts sit on the set of nodes S_l.
  Dispatch: a_l sends the vector once to every node of S_l other than a_l. Combine: every node of S_l
  other than a_next sends its summed partial output (one vector) to a_next, the node where the token's
  next layer runs (the home after the last layer); the residual rides with a dispatched copy, so it
  costs nothing extra. Token ids, gate weights and routing metadata are not counted (a few bytes).
- Pinned attention (naive, grouping): a request's KV cache lives on its home, so a_l = a_next = home.
- Mobile attention (shuffling, grouping+shuffling; speculative token shuffling): at layer l, once l's
  route is known, the token's next node a_next is chosen from the predicted experts of layer l+1
  (the node maximising [hosts one of l's experts] + P(hosts one of l+1's experts)); the combine of l
  goes straight there and layer l+1's attention runs there. A wrong guess falls back to an ordinary
  dispatch from a_next. Attention can run anywhere only if every node holds the KV cache of every
  request, so each token's new K/V at each layer (kv_elems values) is sent to the N-1 other nodes:
  that replication is counted as KV bytes of these schemes (and costs N x the KV memory).
- Request shuffling (router/shuffle.py, what the cluster engine runs live, with the same policy and
  bookkeeping, `Homes`): attention stays pinned, but before each step (one position of every request
  that has it) the step's requests may move to another node, their KV for the positions so far
  (pos x num_layers x kv_elems values) copied there and counted as migrate bytes. Every request is
  running from the first step (decoding is concurrent) until its last token, and counts toward the
  nodes' load until then.
  The policy sees the fit part's tokens (to learn each request's shards) and moves only in the
  report part, where the first move copies half the request's context. With replicas
  (router/replicas.py), each node also holds copies of the `replicas_per_layer` remote experts that
  the fit tokens of the requests homed there used most (within the load limit); a token whose expert
  has a copy on its node uses it. The copies' memory is reported (`replica_memory_overhead`).
- Fit and report: the first `fit_fraction` of every request's tokens (by position) fit the statistics
  and expert grouping; bytes, loads and recall are measured on the rest, in decode order (position,
  then request). Predictors are warmed on the fit part and keep learning online in the report part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from router.grouping import GroupingConfig, Placement, group_experts, round_robin
from router.predictors import (AffinityPredictor, MixturePredictor, PreviousRoutePredictor, RecallMeter,
                               RouteContext, top_k_ids)
from router.replay_report import report
from router.replay_requests import fit_replicas, make_homes, node_hits, token_routes
from router.replicas import Replicas, worker_tables
from router.shuffle import Homes
from router.stats import MISSING, RouteTable, coactivation, popularity, route_table, transitions
from router.traces import RouteRecord


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    nodes: int
    hidden_size: int = 4096  # Mixtral-8x7B
    dtype_bytes: int = 2  # bf16
    fit_fraction: float = 0.5
    kv_elems: int = 2048  # K+V values one token writes per layer (Mixtral: 2 x 8 KV heads x 128)
    max_distance: int = 3  # predictor lookahead measured
    max_load_ratio: float = 1.25
    replicas_per_layer: int = 1  # expert copies per layer and node (request shuffling with replicas)

    def __post_init__(self) -> None:
        if self.replicas_per_layer < 0:
            raise ValueError(f"replicas_per_layer must be >= 0, got {self.replicas_per_layer}")
        for name in ("nodes", "hidden_size", "dtype_bytes", "max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.fit_fraction < 1.0:
            raise ValueError(f"fit_fraction must be in (0, 1), got {self.fit_fraction}")
        if self.kv_elems < 0:
            raise ValueError(f"kv_elems must be >= 0, got {self.kv_elems}")


@dataclass(slots=True)
class Scheme:
    name: str
    placement: Placement
    mobile: bool  # attention follows the token (speculative token shuffling)
    oracle: bool = False  # the next node is chosen from the actual next route (a bound, not a scheme)
    homes: Homes | None = None  # request shuffling: pinned attention whose requests move between nodes
    replicas: Replicas | None = None  # per node: layer -> experts it holds copies of
    migrate_bytes: int = 0
    requests_moved: int = 0
    dispatch: int = 0  # vectors sent
    combine: int = 0
    layer_visits: int = 0  # token-layers simulated
    local: int = 0  # token-layers whose experts all sat on a_l
    expert_load: np.ndarray = field(init=False)  # [L, N] token-expert assignments
    attention_load: np.ndarray = field(init=False)  # [N] token-layers attended
    tables: list[dict[int, tuple[int, ...]]] = field(init=False)  # per node a: layer -> node serving each expert

    def __post_init__(self) -> None:
        nodes = self.placement.nodes
        self.expert_load = np.zeros((self.placement.node_of.shape[0], nodes))
        self.attention_load = np.zeros(nodes)
        owner = dict(enumerate(self.placement.node_of.tolist()))  # node n runs expert shard n
        self.tables = worker_tables(owner, self.replicas or [{} for _ in range(nodes)], range(nodes))

    def hosts(self, layer: int, ids: tuple[int, ...], at: int) -> list[int]:
        """The node serving each expert for a token attended on node `at` (a copy there, else the owner)."""
        row = self.tables[at][layer]
        return [row[e] for e in ids]

    def home(self, r: int) -> int:
        """Where request r attends now (pinned: r mod N)."""
        return r % self.placement.nodes if self.homes is None else self.homes.kv_at[r]


def split_fit(table: RouteTable, fraction: float) -> np.ndarray:
    """[T] bool: the first ceil(fraction x n) tokens (by position) of each request's n tokens."""
    fit = np.zeros(table.num_tokens, dtype=bool)
    for r in range(len(table.requests)):
        idx = np.nonzero(table.request_index == r)[0]
        fit[idx[:int(np.ceil(fraction * len(idx)))]] = True
    return fit


def decode_order(table: RouteTable, mask: np.ndarray) -> np.ndarray:
    """Indices of the tokens in `mask`, by position then request (concurrent decoding)."""
    idx = np.nonzero(mask)[0]
    return idx[np.lexsort((table.request_index[idx], table.pos[idx]))]


def fit_placements(fit: RouteTable, config: ReplayConfig) -> dict[str, Placement]:
    """Grouped placements from the fit part: pinned attention gains only from co-activated experts
    sharing a node; mobile attention also from l -> l+1 steps staying on one node."""
    pop, co, tr = popularity(fit), coactivation(fit), transitions(fit)
    pinned = GroupingConfig(config.nodes, config.max_load_ratio, transition_weight=0.0)
    mobile = GroupingConfig(config.nodes, config.max_load_ratio)
    return {"pinned": group_experts(pop, co, tr, pinned), "mobile": group_experts(pop, co, tr, mobile)}


def _next_node(scheme: Scheme, here: set[int], layer: int, probs: np.ndarray | None, actual: tuple[int, ...],
               current: int, k: int) -> int:
    """The node maximising [hosts one of this layer's experts] + P(hosts one of layer `layer`'s experts)."""
    value = np.zeros(scheme.placement.nodes)
    value[list(here)] += 1.0
    node_of = scheme.placement.node_of[layer]
    if scheme.oracle:
        value[node_of[list(actual)]] += 1.0
    elif probs is not None:
        miss = np.bincount(node_of, weights=np.log1p(-np.minimum(k * probs, 1.0 - 1e-9)), minlength=len(value))
        value += 1.0 - np.exp(miss)
    value[current] += 1e-6  # ties: stay
    return int(np.argmax(value))


def _visit(scheme: Scheme, layer: int, ids: tuple[int, ...], at: int, dest: int) -> None:
    served = scheme.hosts(layer, ids, at)
    nodes = set(served)
    scheme.dispatch += len(nodes - {at})
    scheme.combine += len(nodes - {dest})
    scheme.local += nodes <= {at}
    scheme.layer_visits += 1
    for n in served:
        scheme.expert_load[layer, n] += 1
    scheme.attention_load[at] += 1


def warm_up(predictor: MixturePredictor, table: RouteTable, order: np.ndarray) -> None:
    for t in order:
        request, pos = table.requests[table.request_index[t]], int(table.pos[t])
        for layer, ids in token_routes(table, t):
            predictor.observe(request, pos, layer, ids)


def steps(table: RouteTable, order: np.ndarray) -> list[np.ndarray]:
    """Tokens in decode order cut into engine steps: one position of every request that has it."""
    return np.split(order, np.nonzero(np.diff(table.pos[order]))[0] + 1) if len(order) else []


def _shuffle(s: Scheme, table: RouteTable, step: np.ndarray) -> None:
    """Request shuffling before a step, as the live engine plans it: the step's requests may move."""
    running = {int(table.request_index[t]): int(table.pos[t]) for t in step}
    for r, pos in running.items():
        s.homes.arrive(r, fresh=pos == 0)
    moved = s.homes.shuffle(running)
    s.migrate_bytes += sum(m.cross_node_bytes for m in moved)
    s.requests_moved += len(moved)


def observe_requests(table: RouteTable, order: np.ndarray, schemes: list[Scheme], done: np.ndarray) -> None:
    """The request shufflers learn from the fit tokens (no moves: each request at its home); requests
    whose tokens all fit (`done`: request indices) then leave."""
    for s in (s for s in schemes if s.homes is not None):
        for t in order:
            r = int(table.request_index[t])
            at = s.homes.arrive(r, fresh=table.pos[t] == 0)
            s.homes.observe(r, node_hits(s.tables[at], token_routes(table, t), s.placement.nodes))
        for r in done:
            s.homes.release(int(r))


def simulate(table: RouteTable, order: np.ndarray, schemes: list[Scheme], predictor: MixturePredictor,
             meters: dict[str, RecallMeter], config: ReplayConfig) -> None:
    """Walks the report tokens step by step and layer by layer: predict, measure recall, move requests
    and tokens, count bytes. A request leaves (its KV freed, the shuffler forgets it) after its last token."""
    last = {int(table.request_index[t]): i for i, step in enumerate(steps(table, order)) for t in step}
    for i, step in enumerate(steps(table, order)):
        for s in schemes:
            if s.homes is not None:
                _shuffle(s, table, step)
        for t in step:
            _token(table, t, schemes, predictor, meters, config)
        for r in (int(table.request_index[t]) for t in step if last[int(table.request_index[t])] == i):
            for s in schemes:
                if s.homes is not None:
                    s.homes.release(r)


def _token(table: RouteTable, t: int, schemes: list[Scheme], predictor: MixturePredictor,
           meters: dict[str, RecallMeter], config: ReplayConfig) -> None:
    k, depth = table.top_k, config.max_distance
    request, pos, r = table.requests[table.request_index[t]], int(table.pos[t]), int(table.request_index[t])
    routes, route = token_routes(table, t), {}
    homes = {s.name: s.home(r) for s in schemes}
    where = dict(homes)
    for i, (layer, ids) in enumerate(routes):
        predictor.observe(request, pos, layer, ids)
        route[layer] = ids
        ctx = RouteContext(request, pos, layer, route)
        nxt = routes[i + 1] if i + 1 < len(routes) else None
        mixed = _measure(predictor, ctx, table.experts[t], meters, k, depth, nxt[0] if nxt else None)
        for s in schemes:
            at = where[s.name]
            here = set(s.hosts(layer, ids, at))
            dest = (homes[s.name] if nxt is None or not s.mobile
                    else _next_node(s, here, nxt[0], mixed, nxt[1], at, k))
            _visit(s, layer, ids, at, dest)
            where[s.name] = dest
    for s in schemes:
        if s.homes is not None:
            s.homes.observe(r, node_hits(s.tables[homes[s.name]], routes, s.placement.nodes))


def _measure(predictor: MixturePredictor, ctx: RouteContext, actual: np.ndarray, meters: dict[str, RecallMeter],
             k: int, depth: int, next_layer: int | None) -> np.ndarray | None:
    """Scores every component and the mixture for layers l+1..l+depth, updates the recall meters;
    returns the mixture's scores for `next_layer` (None when out of reach)."""
    out = None
    for target in range(ctx.layer + 1, min(ctx.layer + depth, predictor.num_layers - 1) + 1):
        parts = [c.scores(ctx, target) for c in predictor.components]
        mixed = predictor.pool_scores(parts)
        truth = [int(e) for e in actual[target] if e != MISSING]
        for name, s in zip([c.name for c in predictor.components] + [predictor.name], parts + [mixed]):
            if s is not None and truth:
                meters[name].update(ctx.layer, target, top_k_ids(s, k), truth)
        out = mixed if target == next_layer else out
    return out


def replay_placement(records: Iterable[RouteRecord], nodes: int, hidden_size: int = 4096, dtype_bytes: int = 2,
                     fit_fraction: float = 0.5, kv_elems: int = 2048, max_distance: int = 3,
                     replicas_per_layer: int = 1) -> dict:
    """Simulate naive and speculative placements of a trace on `nodes` nodes; a JSON-able report."""
    config = ReplayConfig(nodes, hidden_size, dtype_bytes, fit_fraction, kv_elems, max_distance,
                          replicas_per_layer=replicas_per_layer)
    table = route_table(records)
    fit = split_fit(table, config.fit_fraction)
    if fit.all():
        raise ValueError("the trace is too short to split: every request has a single token")
    grouped = fit_placements(table.select(fit), config)
    naive = round_robin(table.num_layers, table.num_experts, nodes)
    vector, kv = config.hidden_size * config.dtype_bytes, config.kv_elems * config.dtype_bytes
    schemes = [Scheme("naive", naive, False), Scheme("grouping", grouped["pinned"], False),
               Scheme("shuffling", naive, True), Scheme("grouping+shuffling", grouped["mobile"], True),
               Scheme("grouping+shuffling (perfect prediction)", grouped["mobile"], True, oracle=True),
               Scheme("request shuffling", naive, False, homes=make_homes(table, config.nodes, vector, kv)),
               Scheme("grouping+request shuffling", grouped["mobile"], False,
                      homes=make_homes(table, config.nodes, vector, kv)),
               Scheme("grouping+request shuffling+replicas", grouped["mobile"], False,
                      homes=make_homes(table, config.nodes, vector, kv),
                      replicas=fit_replicas(table.select(fit), grouped["mobile"], config.replicas_per_layer,
                                            config.max_load_ratio))]
    L, E = table.num_layers, table.num_experts
    predictor = MixturePredictor([AffinityPredictor(L, E, max_distance), PreviousRoutePredictor(L, E)])
    meters = {name: RecallMeter(max_distance, L) for name in ("affinity", "previous", "mixture")}
    warm_up(predictor, table, decode_order(table, fit))
    all_fit = np.setdiff1d(table.request_index, table.request_index[~fit])  # requests with no report tokens
    observe_requests(table, decode_order(table, fit), schemes, all_fit)
    simulate(table, decode_order(table, ~fit), schemes, predictor, meters, config)
    return report(table, fit, schemes, meters, grouped, config)

"""LiveRouteMeter (torch-free): the route predictors run beside the engine and their recall is measured.

After every engine step it receives the step's routes, token by token in the order the engine ran
them. For each token and MoE layer l it first asks the mixture predictor (inter-layer affinity x
the token's previous route, learned online from everything seen so far) for layers l+1 .. l+D,
scores those guesses against the token's actual routes, then lets the predictor observe layer l.
Pre-gating guesses (the next layer's gate applied to this layer's hidden state, computed by the
model) are scored the same way at distance 1.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from router.predictors import AffinityPredictor, MixturePredictor, PreviousRoutePredictor, RecallMeter, RouteContext

Routes = Mapping[int, tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]]]  # layer -> ([T][k] ids, weights)


class LiveRouteMeter:
    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_k: int, max_distance: int = 2) -> None:
        self.layers = tuple(moe_layers)
        num_layers = max(self.layers) + 1
        self.top_k, self.max_distance = top_k, max_distance
        self.predictor = MixturePredictor([AffinityPredictor(num_layers, num_experts, max_distance),
                                           PreviousRoutePredictor(num_layers, num_experts)])
        self.mixture = RecallMeter(max_distance, num_layers)
        self.pregate = RecallMeter(1, num_layers)

    def observe_step(self, tokens: Sequence[tuple[str, int]], routes: Routes,
                     pregate: Mapping[int, Sequence[Sequence[int]]] | None = None) -> None:
        """tokens[t] = (request, position) of row t; pregate[l][t]: predicted experts of layer l."""
        for t, (request, pos) in enumerate(tokens):
            actual = {layer: tuple(routes[layer][0][t]) for layer in self.layers if layer in routes}
            for layer in sorted(actual):
                if pregate and layer in pregate:
                    self.pregate.update(layer - 1, layer, pregate[layer][t], actual[layer])
                self.predictor.observe(request, pos, layer, actual[layer])
                seen = {l: ids for l, ids in actual.items() if l <= layer}
                ctx = RouteContext(request, pos, layer, seen)
                for target, guess in self.predictor.predict(ctx, self.max_distance, self.top_k).items():
                    if target in actual:
                        self.mixture.update(layer, target, guess, actual[target])

    def recall(self) -> dict[int, float]:
        """Mixture recall so far by lookahead distance (layers ahead), for the metrics."""
        return {d: self.mixture.recall(d) for d in range(1, self.max_distance + 1) if self.mixture.total[d - 1].sum()}

    def report(self) -> dict:
        return {"mixture": self.mixture.as_dict(), "pregate": self.pregate.as_dict(per_layer=True)}

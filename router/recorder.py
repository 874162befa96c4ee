"""TraceRecorder (torch-free): the engine's routing decisions, appended to a JSONL trace as it runs.

Records are in the format of ../shared/traces/ (router/traces.py reads them back): one line per
(token, MoE layer) with the request id, the token's position, the chosen experts and their gate
weights, token by token in the order the engine ran them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from router.traces import RouteRecord, write_record

Routes = Mapping[int, tuple[Sequence[Sequence[int]], Sequence[Sequence[float]]]]  # layer -> ([T][k] ids, weights)


class TraceRecorder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self.records = 0

    def record_step(self, tokens: Sequence[tuple[str, int]], routes: Routes) -> None:
        """tokens[t] = (request id, position) of row t of every layer's routes."""
        layers = sorted(routes)
        for t, (request, pos) in enumerate(tokens):
            for layer in layers:
                ids, weights = routes[layer]
                write_record(self._file, RouteRecord(request, pos, layer, tuple(ids[t]), tuple(weights[t])))
        self.records += len(tokens) * len(layers)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

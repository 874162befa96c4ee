"""Routing traces (torch-free): one JSON object per routing decision, as in ../shared/traces/.

    {"problem_id": 0, "token_idx": 3, "layer": 5, "experts": [6, 5], "gating_probs": [0.7, 0.3]}

The request key is `problem_id` or `request_id`; the position key `token_idx` or `token_pos`.
Any expert count and top-k are accepted; the trace's shape is inferred from the records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator


class TraceError(ValueError):
    """A trace file or record that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class RouteRecord:
    request: str  # request (sequence) id, as a string
    pos: int  # token position in its sequence
    layer: int  # MoE layer index
    experts: tuple[int, ...]  # top-k expert ids, descending gate weight
    weights: tuple[float, ...]  # their gate weights (same length as experts)


@dataclass(frozen=True, slots=True)
class TraceShape:
    num_layers: int  # max layer index + 1
    num_experts: int  # max expert id + 1
    top_k: int  # max experts per record


def parse_record(obj: dict) -> RouteRecord:
    """One decoded JSON object -> RouteRecord (TraceError naming the missing or bad field)."""
    if not isinstance(obj, dict):
        raise TraceError(f"expected a JSON object, got {type(obj).__name__}")
    request = obj.get("request_id", obj.get("problem_id"))
    pos = obj.get("token_idx", obj.get("token_pos"))
    if request is None:
        raise TraceError("record has neither 'request_id' nor 'problem_id'")
    if pos is None:
        raise TraceError("record has neither 'token_idx' nor 'token_pos'")
    for key in ("layer", "experts"):
        if key not in obj:
            raise TraceError(f"record has no {key!r}")
    experts = tuple(int(e) for e in obj["experts"])
    raw = obj.get("gating_probs", obj.get("weights"))
    weights = tuple(float(w) for w in raw) if raw is not None else (1.0 / max(len(experts), 1),) * len(experts)
    if len(weights) != len(experts):
        raise TraceError(f"{len(experts)} experts but {len(weights)} gate weights")
    if not experts or min(experts) < 0 or int(obj["layer"]) < 0 or int(pos) < 0:
        raise TraceError("layer, token position and expert ids must be >= 0 and experts non-empty")
    dataset = obj.get("dataset")
    request = f"{dataset}/{request}" if dataset is not None else str(request)
    return RouteRecord(request, int(pos), int(obj["layer"]), experts, weights)


def read_trace(path: str | Path) -> list[RouteRecord]:
    """Every record of a JSONL trace, in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(json.loads(line)))
            except (json.JSONDecodeError, TraceError, TypeError, ValueError) as exc:
                raise TraceError(f"{path}:{lineno}: {exc}") from None
    if not records:
        raise TraceError(f"{path}: the trace has no records")
    return records


def trace_shape(records: Iterable[RouteRecord]) -> TraceShape:
    layers = experts = top_k = 0
    for r in records:
        layers, experts, top_k = max(layers, r.layer + 1), max(experts, max(r.experts) + 1), max(top_k, len(r.experts))
    return TraceShape(layers, experts, top_k)


def tokens(records: Iterable[RouteRecord]) -> list[tuple[str, int, dict[int, tuple[int, ...]]]]:
    """Group records by token, in order of first appearance: (request, pos, {layer: experts})."""
    by_token: dict[tuple[str, int], dict[int, tuple[int, ...]]] = {}
    for r in records:
        by_token.setdefault((r.request, r.pos), {})[r.layer] = r.experts
    return [(req, pos, layers) for (req, pos), layers in by_token.items()]


def write_record(f: IO[str], record: RouteRecord) -> None:
    f.write(json.dumps({"request_id": record.request, "token_idx": record.pos, "layer": record.layer,
                        "experts": list(record.experts), "gating_probs": [round(w, 6) for w in record.weights]}))
    f.write("\n")


def iter_requests(records: Iterable[RouteRecord]) -> Iterator[str]:
    """Request ids in order of first appearance."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r.request, None)
    return iter(seen)
